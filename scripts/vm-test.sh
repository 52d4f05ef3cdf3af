#!/bin/bash
# The VM lab: Debian 12 "bookworm" and 13 "trixie" guests under QEMU with their stock kernels
# (ESP in XFRM) and systemd as PID 1 (tests/vm/), the same scenarios on each. Slow (software
# emulation), so not part of scripts/test.sh; CI runs it. The first run of a suite builds its
# cached guest root file system (a few minutes). Run as root.
#
#   scripts/vm-test.sh [--suite bookworm|trixie]... [--parallel] [pytest arguments]
#
# --suite (repeatable) picks the suites (default: all in tests/vm/guest.py's SUITES);
# --parallel boots the suites' guests at the same time instead of one after the other.
# Other arguments go to pytest (-k ..., a test path); without a test path all of tests/vm runs.
# Prints each suite's wall time; exits non-zero if any suite failed.
set -euo pipefail
cd "$(dirname "$0")/.."
suites=()
parallel=0
args=()
while (($#)); do
  case $1 in
    --suite) suites+=("$2"); shift 2 ;;
    --suite=*) suites+=("${1#--suite=}"); shift ;;
    --parallel) parallel=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
bash scripts/setup.sh
if ((${#suites[@]} == 0)); then
  listed=$(PYTHONPATH=.:tests/vm .venv/bin/python -c 'import guest; print(*guest.SUITES)')
  read -ra suites <<<"$listed"
fi
paths=(tests/vm)
for arg in "${args[@]}"; do if [[ $arg == tests/* ]]; then paths=(); fi; done

run_suite() {  # one pytest run for one suite; its wall time goes to stdout's last line
  local suite=$1 start=$SECONDS rc=0
  # its own base directory: the guests' logs stay until this suite's next run
  mkdir -p "${TMPDIR:-/tmp}/tcpencap-vm-test"
  TCPENCAP_VM_SUITES=$suite .venv/bin/python -m pytest -q -p no:cacheprovider -rA \
    --durations=0 --basetemp="${TMPDIR:-/tmp}/tcpencap-vm-test/$suite" \
    "${paths[@]}" "${args[@]}" || rc=$?
  echo "vm-test: $suite: $((SECONDS - start)) s wall, pytest exit $rc"
  return "$rc"
}

start=$SECONDS
failed=()
if ((parallel)); then
  logs=$(mktemp -d /tmp/vm-test.XXXXXX)
  declare -A pids
  for suite in "${suites[@]}"; do
    run_suite "$suite" >"$logs/$suite.log" 2>&1 &
    pids[$suite]=$!
  done
  for suite in "${suites[@]}"; do
    wait "${pids[$suite]}" || failed+=("$suite")
    echo "===== $suite ($logs/$suite.log)"
    cat "$logs/$suite.log"
  done
else
  for suite in "${suites[@]}"; do run_suite "$suite" || failed+=("$suite"); done
fi
echo "vm-test: ${suites[*]} $( ((parallel)) && echo in parallel || echo in sequence): $((SECONDS - start)) s wall"
if ((${#failed[@]})); then
  echo "vm-test: failed: ${failed[*]}"
  exit 1
fi
