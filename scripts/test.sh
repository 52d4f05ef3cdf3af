#!/bin/bash
# The test suite: set-up, lint, then unit and lab (namespace) tests. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
