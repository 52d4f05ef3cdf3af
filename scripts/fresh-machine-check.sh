#!/bin/bash
# The fresh-machine check: what a newcomer sees on a new Debian 12 or 13 machine, as root.
#
# Builds (once per suite, cached) a minimal Debian root file system with debootstrap, runs this
# checkout's committed HEAD in a throw-away overlay of it, and there runs the README's two
# commands exactly as written: `bash scripts/demo.sh`, then `bash scripts/test.sh`. Nothing
# this machine has installed by hand is visible in there; the chroot shares only the kernel.
#
# Usage: bash scripts/fresh-machine-check.sh [--suite SUITE] [--out DIR] [--rev REV] [--rebuild]
#          [-- TEST ARGS...]
#   --suite SUITE  bookworm (Debian 12, the default) or trixie (Debian 13)
#   --out DIR   where the two logs and the summary go (default: a new /tmp/fresh-check.*)
#   --rev REV   check that commit instead of HEAD
#   --rebuild   rebuild the cached root file system
#   --base-only build (or find) the cached root file system, print its path, and stop: for
#               tests that need a pristine Debian of their own (the Debian package's install)
#   TEST ARGS   passed to scripts/test.sh (e.g. -- -m "not lab" for a quick look)
# Run it before resolving any change to set-up, packaging or dependencies. Exit 0 only if
# both commands succeed. Needs root, debootstrap and git (scripts/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

out="" rev=HEAD rebuild=0 test_args=() suite=bookworm base_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) suite=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --rev) rev=$2; shift 2 ;;
    --rebuild) rebuild=1; shift ;;
    --base-only) base_only=1; shift ;;
    --) shift; test_args=("$@"); break ;;
    *) echo "usage: $0 [--suite bookworm|trixie] [--out DIR] [--rev REV] [--rebuild] [-- TEST ARGS...]" >&2
       exit 2 ;;
  esac
done
case "$suite" in
  bookworm|trixie) ;;
  *) echo "fresh-machine-check: suite '$suite' is not supported (bookworm or trixie)" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "fresh-machine-check: run as root" >&2; exit 1; }
for tool in debootstrap git; do
  command -v "$tool" >/dev/null || { echo "fresh-machine-check: $tool missing (bash scripts/setup.sh)" >&2; exit 1; }
done
[ -n "$out" ] || out=$(mktemp -d /tmp/fresh-check.XXXXXX)
mkdir -p "$out"
out=$(cd "$out" && pwd)

# The cache is keyed by everything that decides its content (so each suite has its own).
mirror=http://deb.debian.org/debian variant=minbase
cache_root=${TCPENCAP_VM_CACHE:-/var/cache/tcpencap-vm}
key=$(printf '%s %s %s' "$suite" "$mirror" "$variant" | sha256sum | cut -c1-12)
base="$cache_root/fresh-$key"
if [ "$rebuild" = 1 ] || [ ! -f "$base/.complete" ]; then
  rm -rf "$base" "$base.tmp"
  mkdir -p "$cache_root"
  echo "fresh-machine-check: debootstrap $variant $suite into $base" >&2
  start=$SECONDS
  debootstrap --variant="$variant" "$suite" "$base.tmp" "$mirror" >"$out/debootstrap.log" 2>&1 \
    || { tail -20 "$out/debootstrap.log" >&2; exit 1; }
  mv "$base.tmp" "$base"
  touch "$base/.complete"
  echo "fresh-machine-check: root file system built in $((SECONDS - start)) s" >&2
fi
if [ "$base_only" = 1 ]; then
  echo "$base"
  exit 0
fi

# A throw-away overlay of the pristine base: each run starts from the same fresh machine.
work=$(mktemp -d /tmp/fresh-root.XXXXXX)
root="$work/root"
mkdir -p "$work/upper" "$work/work" "$root"
mounts=()
cleanup() {
  set +e
  # Anything the run left in the chroot's namespaces or processes goes with it.
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$root" ] && kill -9 "$pid" 2>/dev/null
  done
  for ns in "$root"/run/netns/*; do
    [ -e "$ns" ] && umount "$ns" 2>/dev/null
  done
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
mount -t overlay overlay -o "lowerdir=$base,upperdir=$work/upper,workdir=$work/work" "$root"
mounts+=("$root")
mount -t proc proc "$root/proc" && mounts+=("$root/proc")
mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys" && mounts+=("$root/sys")
mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev" && mounts+=("$root/dev")
mount -t tmpfs tmpfs "$root/run" && mounts+=("$root/run")
mount -t tmpfs tmpfs "$root/tmp" && mounts+=("$root/tmp")
cp /etc/resolv.conf "$root/etc/resolv.conf"
# This machine's network passes TLS through an intercepting proxy whose CA only the bundle
# named by PIP_CERT has: pip in the chroot gets that bundle and nothing else of this machine.
pip_env=()
host_ca=${PIP_CERT:-${SSL_CERT_FILE:-}}
if [ -n "$host_ca" ] && [ -f "$host_ca" ]; then
  cp "$host_ca" "$root/run/host-ca.pem"
  pip_env=(PIP_CERT=/run/host-ca.pem)
fi

# The newcomer's checkout: a clone of a commit (what would land), not the work tree.
git clone -q --no-hardlinks "$repo" "$root/root/tcpencap"
git -C "$root/root/tcpencap" checkout -q --detach "$(git rev-parse "$rev")"
git -C "$root/root/tcpencap" log -1 --format="fresh-machine-check: $suite, checkout %h %s" \
  | tee "$out/summary.txt"

run_step() {  # name, command...: runs in the chroot, logs, records the wall time
  local name=$1; shift
  local start=$SECONDS rc=0
  chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${pip_env[@]}" \
    /bin/bash -c 'cd /root/tcpencap && exec "$@"' bash "$@" >"$out/$name.log" 2>&1 || rc=$?
  echo "fresh-machine-check: $name: exit $rc in $((SECONDS - start)) s: $(tail -1 "$out/$name.log")" \
    | tee -a "$out/summary.txt"
  return $rc
}
status=0
run_step demo bash scripts/demo.sh || status=1
run_step test bash scripts/test.sh "${test_args[@]}" || status=1
grep -q '^demo succeeded' "$out/demo.log" || { echo "fresh-machine-check: no 'demo succeeded'" | tee -a "$out/summary.txt"; status=1; }
echo "fresh-machine-check: logs in $out" | tee -a "$out/summary.txt"
exit $status
