"""The install as plugin/README.md gives it: the plugins directory in FiftyOne's config file
(not a shell export), holding a link to the installed package's plugin folder. A process
started with none of this test run's plugin settings in its environment (as a worker or the
App started from another shell) finds the operators through the config file alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fiftyone  # noqa: F401, I001  (conftest has set the environment)

from .conftest import PLUGIN_NAME

FIFTYONE = str(Path(sys.executable).with_name("fiftyone"))


def test_workers_and_the_app_find_the_plugin_through_the_config_file(mongod, tmp_path):
    # README: the installed package's plugin folder
    plugin_dir = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, xmem_label.plugin as p; print(os.path.dirname(p.__file__))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert (Path(plugin_dir) / "fiftyone.yml").is_file()
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "xmem-label").symlink_to(plugin_dir)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"plugins_dir": str(plugins)}))

    env = {k: v for k, v in os.environ.items() if k != "FIFTYONE_PLUGINS_DIR"}
    env["FIFTYONE_CONFIG_PATH"] = str(config)  # in real life, the default ~/.fiftyone/config.json
    listed = subprocess.run(
        [FIFTYONE, "operators", "list"], env=env, check=True, capture_output=True, text=True
    ).stdout
    operators = ("propagate_masks", "propagate_corrections", "suggest_frames", "review_frames")
    for operator in (*operators, "propagation_status"):
        assert f"{PLUGIN_NAME}/{operator}" in listed, listed
