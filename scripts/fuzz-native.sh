#!/bin/bash
# Fuzz the native data path (tcpencap/native) under AddressSanitizer and UBSan, for a bounded
# time per target, with libFuzzer (clang, from scripts/setup.sh).
#
#   scripts/fuzz-native.sh [--seconds N] [--src DIR] [--out DIR] [TARGET...]
#
# TARGETs are tests/fuzz/native/fuzz_<name>.c (default: all). Each is built with
# -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all into --out (default
# build/fuzz-native; the in-place extension the product loads is never touched) against the
# sources under --src (default: this checkout; a test points it at a deliberately broken
# copy), then run for --seconds (default $FUZZ_NATIVE_SECONDS or 20) on a corpus kept in
# --out/corpus/<name>. Prints per target: runs, coverage (cov: edges, ft: features) and "no
# reports". Any sanitizer report, broken invariant, crash, leak or timeout fails the run
# (exit 1) and is printed, with the input that caused it kept in --out/artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

seconds=${FUZZ_NATIVE_SECONDS:-20}
src=$repo
out=$repo/build/fuzz-native
targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) seconds=$2; shift 2 ;;
    --src) src=$(cd "$2" && pwd); shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "fuzz-native: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  for f in tests/fuzz/native/fuzz_*.c; do
    t=${f##*/fuzz_}
    targets+=("${t%.c}")
  done
fi

PY=${PYTHON:-.venv/bin/python}
command -v clang >/dev/null || { echo "fuzz-native: clang is missing: run scripts/setup.sh" >&2; exit 1; }
pyconf() { "$PY" -c "import sysconfig; print(sysconfig.get_config_var('$1'))"; }
inc=$(pyconf INCLUDEPY)
libdir=$(pyconf LIBDIR)
ldversion=$(pyconf LDVERSION)
[ -f "$inc/Python.h" ] || { echo "fuzz-native: no Python.h in $inc: install python3-dev" >&2; exit 1; }

mkdir -p "$out/bin" "$out/logs" "$out/artifacts"
CFLAGS=(-g -O1 -Wall -Wno-unused-function -fno-omit-frame-pointer -pthread
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all)
for t in "${targets[@]}"; do
  [ -f "tests/fuzz/native/fuzz_$t.c" ] || { echo "fuzz-native: no target '$t'" >&2; exit 2; }
  clang "${CFLAGS[@]}" -I"$src" -I"$inc" "tests/fuzz/native/fuzz_$t.c" -o "$out/bin/fuzz_$t" \
    -L"$libdir" -lpython"$ldversion" -Wl,-rpath,"$libdir" \
    || { echo "fuzz-native: building $t failed (libFuzzer is in libclang-rt-14-dev: scripts/setup.sh)" >&2; exit 1; }
done

# A report stops the target at once (-fno-sanitize-recover, libFuzzer's default on a crash);
# detect_leaks makes libFuzzer check every input for leaks too.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:quarantine_size_mb=64:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
start=$SECONDS
for t in "${targets[@]}"; do
  log=$out/logs/$t.log
  mkdir -p "$out/corpus/$t"
  rc=0
  "$out/bin/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$out/artifacts/$t-" "$out/corpus/$t" \
    >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)
  if [ "$rc" = 0 ] && ! grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|fuzz invariant broken' "$log"; then
    echo "fuzz-native: $t: ${runs:-0} runs in $seconds s, ${cov:-cov: ?}: no reports"
  else
    failed+=("$t")
    echo "fuzz-native: $t: REPORT after ${runs:-?} runs (exit $rc), log $log:" >&2
    # the report: from its first line to libFuzzer's summary of the input
    grep -vE '^(#[0-9]+|INFO:)|^"|Uses: [0-9]+$|recommended dictionary' "$log" | head -80 >&2
    ls "$out/artifacts/$t-"* 2>/dev/null | sed 's/^/fuzz-native:   input: /' >&2 || true
  fi
done
echo "fuzz-native: ${#targets[@]} targets in $((SECONDS - start)) s, $seconds s each"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz-native: FAILED: ${failed[*]}" >&2
  exit 1
fi
