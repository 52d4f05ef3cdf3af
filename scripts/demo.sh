#!/bin/bash
# The demo: two strongSwan peers that can only reach each other over TCP. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The demo is test-side code (tests/labkit/demo.py): run from the checkout, not the package.
exec .venv/bin/python -m tests.labkit.demo "$@"
