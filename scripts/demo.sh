#!/bin/bash
# The demo: two strongSwan peers that can only reach each other over TCP. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tcpencap.demo "$@"
