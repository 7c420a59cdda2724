#!/usr/bin/env bash
# Set up this machine (if needed), bring up the default lab, start its VM,
# show it alive, and tear the lab down. Pass --keep to leave the lab up.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo --preserve-env=LABCTL_HOME"; fi
exec $SUDO .venv/bin/labctl demo "$@"
