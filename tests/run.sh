#!/usr/bin/env bash
# Install everything the test suite needs, then run it:   bash tests/run.sh [pytest args]
#
# 1. Debian packages: ffmpeg (FiftyOne reads video metadata with it), chromium + chromedriver
#    (the two browser checks), redis-server (the backend's job queue past one machine,
#    tests/backend/test_queue_redis.py). Installed with apt-get when missing (root, or sudo).
# 2. .venv: torch 2.13.0 first (a CPU build from local disk on our machines), then this
#    package with all extras, installed editable (PEP 660), so the tests run the code in this
#    checkout as it is edited.
# 3. .venv-ls: the Label Studio 1.23.2 server for the end-to-end tests. It is a separate
#    program we talk to over HTTP, and its pins (Django, ...) are not ours to share a venv with.
# 4. ruff (lint and format check), mypy on model/, then pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XMEM_LABEL_VENV:-$ROOT/.venv}"
LS_VENV="${XMEM_LABEL_LS_VENV:-$ROOT/.venv-ls}"
PY="${PYTHON:-python3}"
step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

step "Debian packages"
missing=()
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v redis-server >/dev/null || missing+=(redis-server)
if ((${#missing[@]})); then
  sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

step "Python environment $VENV"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e "$ROOT[all]"

step "Label Studio server $LS_VENV"
[[ -x "$LS_VENV/bin/python" ]] || "$PY" -m venv "$LS_VENV"
"$LS_VENV/bin/pip" install -q label-studio==1.23.2
export LABEL_STUDIO_BIN="$LS_VENV/bin/label-studio"

export PATH="$VENV/bin:$PATH"
cd "$ROOT"
step "ruff, mypy"
ruff check .
ruff format --check .
mypy  # model/, configured in pyproject.toml
step "pytest"
python -m pytest "$@"
step "done"
