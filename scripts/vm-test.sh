#!/bin/bash
# The VM lab: Debian 12 guests under QEMU with the stock kernel (ESP in XFRM) and systemd as
# PID 1 (tests/vm/). Slow (software emulation), so not part of scripts/test.sh; CI runs it.
# The first run builds the cached guest root file system (a few minutes). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Arguments go to pytest; without a test path among them, all of tests/vm runs.
paths=(tests/vm)
for arg in "$@"; do if [[ $arg == tests/* ]]; then paths=(); fi; done
exec .venv/bin/python -m pytest -q -p no:cacheprovider -rA "${paths[@]}" "$@"
