#!/usr/bin/env bash
# Set up this machine (if needed), then run ruff, mypy, the import contracts
# (lint-imports) and the whole test suite, end-to-end tests on the real lab included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check labctl tests bench images
.venv/bin/mypy
.venv/bin/lint-imports
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo --preserve-env=LABCTL_HOME"; fi
$SUDO .venv/bin/python -m pytest -v -p no:cacheprovider "$@"
