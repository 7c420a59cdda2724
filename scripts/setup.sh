#!/usr/bin/env bash
# Install everything labctl needs on a Debian 12 (or newer) machine, then
# create .venv with labctl installed in it. Safe to run again: it only
# installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

. /etc/os-release
BACKPORTS=()
if [ "${VERSION_CODENAME:-}" = "bookworm" ]; then
  # QEMU 7.2 corrupts TCG guests during migration and libvirt 9.0 cannot
  # start QEMU 10: take both from Debian's own bookworm-backports.
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" |
      $SUDO tee /etc/apt/sources.list.d/labctl-backports.list >/dev/null
  fi
  BACKPORTS=(-t bookworm-backports)
fi

BP_PKGS=(qemu-system-x86 qemu-utils qemu-block-extra libvirt-daemon
         libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
         # vagrant-libvirt makes networks and uploads boxes into a storage pool
         libvirt-daemon-driver-network libvirt-daemon-driver-storage)
PKGS=(libiscsi-bin mmdebstrap e2fsprogs iproute2 kmod util-linux gcc libc6-dev pkg-config
      python3-venv python3-dev dnsmasq-base socat xxd iputils-ping iperf3 ethtool
      vagrant vagrant-libvirt)  # the hardware path: `vagrant validate` of the Vagrantfile

missing=()
for p in "${BP_PKGS[@]}" "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${VERSION_CODENAME:-}" = "bookworm" ] && command -v qemu-system-x86_64 >/dev/null; then
  major=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p')
  [ "${major:-0}" -ge 9 ] || missing+=(qemu-system-x86)
fi
if [ "${VERSION_CODENAME:-}" = "bookworm" ] && command -v libvirtd >/dev/null; then
  major=$(libvirtd --version | sed -n 's/.* \([0-9]*\)\.[0-9]*\.[0-9]*$/\1/p')
  [ "${major:-0}" -ge 10 ] || missing+=(libvirt-daemon)
fi
# the images are built from Debian packages (the cloud kernel is fetched with apt-get
# download): the package lists must know it
policy=$(apt-cache policy linux-image-cloud-amd64 2>/dev/null || true)
if ! grep -q "Candidate: [0-9]" <<<"$policy"; then
  missing+=(apt-lists)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "labctl setup: missing ${missing[*]}"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${BACKPORTS[@]}" "${BP_PKGS[@]}"
  $SUDO apt-get install -y -q --no-install-recommends "${PKGS[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.labctl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
