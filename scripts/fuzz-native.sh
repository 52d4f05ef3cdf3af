#!/bin/bash
# Fuzz the native data path (tcpencap/native) under AddressSanitizer and UBSan, for a bounded
# time per target, with libFuzzer (clang, from scripts/setup.sh).
#
#   scripts/fuzz-native.sh [--seconds N] [--src DIR] [--out DIR] [TARGET...]
#
# TARGETs are tests/fuzz/native/fuzz_<name>.c, and "extension" (default: all). Each is built with
# -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all into --out (default
# build/fuzz-native; the in-place extension the product loads is never touched), linked with
# the extension's compilation units (tcpencap/native/fastpath.c and src/*.c) under --src
# (default: this checkout; a test points it at a deliberately broken copy), then run for
# --seconds (default $FUZZ_NATIVE_SECONDS or 20) on a corpus kept in --out/corpus/<name>.
# Prints per target: runs, coverage (cov: edges, ft: features) and "no reports". Any
# sanitizer report, broken invariant, crash, leak or timeout fails the run (exit 1) and is
# printed, with the input that caused it kept in --out/artifacts.
# "extension" is the extension itself built with gcc -fsanitize=address,undefined into
# --out/asan-ext, and tests/native/test_fastpath.py (the native path against the Python reference,
# hypothesis-driven, real sockets) and tests/native/test_fastpath_api.py run on it with libasan and
# libubsan preloaded.
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
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "fuzz-native: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  for f in tests/fuzz/native/fuzz_*.c; do
    t=${f##*/fuzz_}
    targets+=("${t%.c}")
  done
  targets+=(extension)
fi

PY=${PYTHON:-.venv/bin/python}
command -v clang >/dev/null || { echo "fuzz-native: clang is missing: run scripts/setup.sh" >&2; exit 1; }
pyconf() { "$PY" -c "import sysconfig; print(sysconfig.get_config_var('$1'))"; }
inc=$(pyconf INCLUDEPY)
libdir=$(pyconf LIBDIR)
ldversion=$(pyconf LDVERSION)
[ -f "$inc/Python.h" ] || { echo "fuzz-native: no Python.h in $inc: install python3-dev" >&2; exit 1; }

mkdir -p "$out/bin" "$out/logs" "$out/artifacts"
# The extension's compilation units: the module definition and its parts, each with a header.
units=("$src/tcpencap/native/fastpath.c" "$src"/tcpencap/native/src/*.c)
CFLAGS=(-g -O1 -Wall -Wno-unused-function -fno-omit-frame-pointer -pthread
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all)
for t in "${targets[@]}"; do
  [ "$t" = extension ] && continue
  [ -f "tests/fuzz/native/fuzz_$t.c" ] || { echo "fuzz-native: no target '$t'" >&2; exit 2; }
  clang "${CFLAGS[@]}" -I"$src" -I"$inc" "tests/fuzz/native/fuzz_$t.c" "${units[@]}" \
    -o "$out/bin/fuzz_$t" -L"$libdir" -lpython"$ldversion" -Wl,-rpath,"$libdir" \
    || { echo "fuzz-native: building $t failed (libFuzzer is in the suite clang's libclang-rt-N-dev: scripts/setup.sh)" >&2; exit 1; }
done

# A report stops the target at once (-fno-sanitize-recover, libFuzzer's default on a crash);
# detect_leaks makes libFuzzer check every input for leaks too.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:quarantine_size_mb=64:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=()
start=$SECONDS
# The extension built by gcc with both sanitizers, and the native tests run on it.
extension() {
  local so
  so=$out/asan-ext/_fastpath$(pyconf EXT_SUFFIX)
  mkdir -p "$out/asan-ext"
  gcc -shared -fPIC -g -O1 -Wall -Wextra -Wmissing-prototypes -Wno-unused-parameter -pthread \
    -fvisibility=hidden -fno-omit-frame-pointer \
    -fsanitize=address,undefined -fno-sanitize-recover=all -I"$inc" "${units[@]}" -o "$so"
  # leaks: the interpreter keeps its own at exit; the libFuzzer targets check every input
  LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
    ASAN_OPTIONS=detect_leaks=0 PYTHONMALLOC=malloc TCPENCAP_FASTPATH_SO=$so \
    PYTHONPATH=tests/fuzz/native "$PY" -m pytest -q -p no:cacheprovider -p asan_extension \
    tests/native/test_fastpath.py tests/native/test_fastpath_api.py
}

for t in "${targets[@]}"; do
  log=$out/logs/$t.log
  rc=0
  if [ "$t" = extension ]; then
    t0=$SECONDS
    extension >"$log" 2>&1 || rc=$?
    runs=$(grep -oE '[0-9]+ passed' "$log" | tail -1 || true)
    runs="tests/native/test_fastpath.py, test_fastpath_api.py: $runs"
    what="gcc build, $runs in $((SECONDS - t0)) s"
  else
    mkdir -p "$out/corpus/$t"
    rm -f "$out/artifacts/$t-"* # what an earlier run found is not this run's finding
    "$out/bin/fuzz_$t" -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$out/artifacts/$t-" "$out/corpus/$t" \
      >"$log" 2>&1 || rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)
    what="${runs:-0} runs in $seconds s, ${cov:-cov: ?}"
  fi
  if [ "$rc" = 0 ] && ! grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|fuzz invariant broken' "$log"; then
    echo "fuzz-native: $t: $what: no reports"
  else
    failed+=("$t")
    echo "fuzz-native: $t: REPORT after ${runs:-?} runs (exit $rc), log $log:" >&2
    # the report, from its first line (or the log's end when there is none to find)
    awk '/==ERROR|runtime error:|fuzz invariant broken|ERROR: libFuzzer|FAILED|Error/ {on=1} on' \
      "$log" | head -100 >&2
    grep -qE '==ERROR|runtime error:|fuzz invariant broken|ERROR: libFuzzer|FAILED|Error' "$log" \
      || tail -40 "$log" >&2
    ls "$out/artifacts/$t-"* 2>/dev/null | sed 's/^/fuzz-native:   input: /' >&2 || true
  fi
done
echo "fuzz-native: ${#targets[@]} targets in $((SECONDS - start)) s, $seconds s each"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz-native: FAILED: ${failed[*]}" >&2
  exit 1
fi
