#!/bin/bash
# Install everything tcpencap, its tests and its demo need on Debian 12 (run as root).
# Idempotent: packages already present are not reinstalled; the venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-extra-plugins
  iptables iproute2 iperf3 socat ipset tshark tcpdump iputils-ping procps
  libnetfilter-queue-dev gcc libc6-dev python3-dev python3-venv vpnc
)

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (namespaces, netfilter and charon need it)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import tcpencap, vici, netfilterqueue, scapy, pyroute2, cryptography, pytest, hypothesis" 2>/dev/null \
   || [ setup.cfg -nt .venv/.installed ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch .venv/.installed
fi
echo "setup: done ($(.venv/bin/python --version), $(/usr/lib/ipsec/charon --version 2>/dev/null | head -1 || echo charon))"
