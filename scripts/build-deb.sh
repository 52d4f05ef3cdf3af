#!/bin/bash
# Build the Debian package tcpencap_<version>_<arch>.deb from a clean export (git archive) of
# the committed tree, with dpkg-buildpackage, and check it with lintian.
#
#   bash scripts/build-deb.sh [--rev REV] [OUTDIR]      (default: HEAD into the checkout's build/deb)
#
# OUTDIR gets the .deb, .changes and .buildinfo, build.log and lintian.txt. The .deb's path
# is the only line on standard output (deb=$(bash scripts/build-deb.sh DIR)); progress goes
# to standard error. Fails on a failed build, a missing build dependency (named by
# dpkg-checkbuilddeps; scripts/setup.sh installs them) or any lintian error. The sdists
# bundled into the package (debian/vendor-requirements.txt, hash-pinned) are fetched from
# PyPI with pip once, into $TCPENCAP_DEB_CACHE (default /var/cache/tcpencap-deb).
set -euo pipefail
caller=$(pwd)
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."

rev=HEAD
out=$(pwd)/build/deb
while [ $# -gt 0 ]; do
  case "$1" in
    --rev) rev=$2; shift 2 ;;
    -h|--help) sed -n "2,12p" "$self"; exit 0 ;;
    -*) echo "build-deb: unknown option $1" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
case "$out" in /*) ;; *) out=$caller/$out ;; esac  # relative to where it was called from
mkdir -p "$out"
out=$(cd "$out" && pwd)
cache=${TCPENCAP_DEB_CACHE:-/var/cache/tcpencap-deb}/sdists
mkdir -p "$cache"
say() { echo "build-deb: $*" >&2; }

start=$(date +%s)
work=$(mktemp -d /tmp/tcpencap-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
src=$work/tcpencap
mkdir "$src"
git archive --format=tar "$rev" | tar -x -C "$src"
if [ -n "$(git status --porcelain --untracked-files=no)" ] && [ "$rev" = HEAD ]; then
  say "note: uncommitted changes are not in the package (it is built from $rev)"
fi

# The sdists whose hashes debian/vendor-requirements.txt pins: from the cache, else from PyPI.
hashes=$(grep -o 'sha256:[0-9a-f]*' "$src/debian/vendor-requirements.txt" | cut -d: -f2)
cached() { sha256sum "$cache"/*.tar.gz 2>/dev/null | grep -q "^$1 "; }
for h in $hashes; do
  cached "$h" && continue
  say "fetching the bundled sdists into $cache"
  /usr/bin/python3 -m venv "$work/pip"
  "$work/pip/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
    --require-hashes -r "$src/debian/vendor-requirements.txt" -d "$cache" >&2
  break
done
mkdir "$src/debian/vendor"
for h in $hashes; do
  file=$(sha256sum "$cache"/*.tar.gz | awk -v h="$h" '$1 == h {print $2}')
  [ -n "$file" ] || { say "no sdist with sha256 $h in $cache"; exit 1; }
  cp "$file" "$src/debian/vendor/"
done

(cd "$src" && dpkg-checkbuilddeps) >&2
say "dpkg-buildpackage -us -uc -b (log: $out/build.log)"
# Debian's tools only: no pyenv or venv Python on PATH.
if ! (cd "$src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b) >"$out/build.log" 2>&1; then
  tail -30 "$out/build.log" >&2
  say "the build failed; see $out/build.log"
  exit 1
fi
rm -f "$out"/tcpencap*_*.deb "$out"/tcpencap_*.changes "$out"/tcpencap_*.buildinfo
mv "$work"/tcpencap*_*.deb "$work"/tcpencap_*.changes "$work"/tcpencap_*.buildinfo "$out/"
deb=$(ls "$out"/tcpencap_*.deb)

say "lintian (log: $out/lintian.txt)"
lintian --info --display-info --pedantic "$out"/tcpencap_*.changes >"$out/lintian.txt" 2>&1 || true
cat "$out/lintian.txt" >&2
if grep -q '^E: ' "$out/lintian.txt"; then
  say "lintian reports errors"
  exit 1
fi
say "built $(basename "$deb") ($(stat -c %s "$deb") octets) in $(($(date +%s) - start)) s"
echo "$deb"
