#!/bin/bash
# The VM lab: Debian 12 guests under QEMU with the stock kernel (ESP in XFRM) and systemd as
# PID 1 (tests/vm/). Slow (software emulation), so not part of scripts/test.sh; CI runs it.
# The first run builds the cached guest root file system (a few minutes). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ $# -gt 0 ] || set -- tests/vm
exec .venv/bin/python -m pytest -q -p no:cacheprovider -rA "$@"
