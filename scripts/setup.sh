#!/bin/bash
# Install everything tcpencap, its tests and its demo need on Debian 12 (bookworm) or Debian 13
# (trixie), run as root. Idempotent: packages already present are not reinstalled; the venv is
# reused. The suite comes from /etc/os-release: package names differ between the two.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
# What both suites call the same.
APT_PACKAGES=(
  strongswan-charon strongswan-swanctl libstrongswan-standard-plugins libstrongswan-extra-plugins
  libcharon-extra-plugins libcharon-extauth-plugins
  iptables iproute2 iperf3 socat ipset tshark tcpdump iputils-ping procps systemd git
  libnetfilter-queue-dev gcc libc6-dev python3-dev python3-venv vpnc openvpn linux-perf
  qemu-system-x86 debootstrap haproxy curl openssl
  clang
  # scripts/build-deb.sh: dpkg-buildpackage needs build-essential, which a fresh Debian lacks
  build-essential dpkg-dev debhelper dh-python fakeroot lintian python3-setuptools python3-wheel
  cython3
)
# Per suite: libFuzzer and the sanitizers' runtimes belong to the suite's default clang
# (14 in bookworm, 19 in trixie).
APT_PACKAGES_bookworm=(libclang-rt-14-dev)
# python3-netfilterqueue: debian/control's first choice where the suite has it (trixie on),
# so the package built here depends on it instead of bundling a build (as on bookworm).
APT_PACKAGES_trixie=(libclang-rt-19-dev python3-netfilterqueue)

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (namespaces, netfilter and charon need it)" >&2
  exit 1
fi
case "$SUITE" in
  bookworm|trixie) ;;
  *) echo "setup: Debian '$SUITE' is not supported: Debian 12 (bookworm) or 13 (trixie)" >&2; exit 1 ;;
esac
# This suite's lists (PLUGIN_PACKAGES_* are below, with the verification).
declare -n SUITE_APT_PACKAGES="APT_PACKAGES_$SUITE" PLUGIN_PACKAGES="PLUGIN_PACKAGES_$SUITE"
APT_PACKAGES+=("${SUITE_APT_PACKAGES[@]}")

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# The editable install builds the native data path (tcpencap/native/fastpath.c) in place:
# a changed C source or build file means building it again.
if ! .venv/bin/python -c "import tcpencap, vici, netfilterqueue, scapy, pyroute2, cryptography, pytest, hypothesis" 2>/dev/null \
   || [ setup.cfg -nt .venv/.installed ] || [ setup.py -nt .venv/.installed ] \
   || [ -n "$(find tcpencap/native -name '*.[ch]' -newer .venv/.installed 2>/dev/null)" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch .venv/.installed
fi
# Verify, so a missing piece fails here, naming its package, instead of deep inside a test.
# Every strongSwan plugin the lab loads, with the package that ships it in each suite
# (tests/project/test_setup.py holds both lists equal to tests/labkit/charon.py's). trixie moved
# openssl into libstrongswan and the software crypto plugins into libstrongswan-extra-plugins.
PLUGIN_PACKAGES_bookworm=(
  random:libstrongswan nonce:libstrongswan pem:libstrongswan pkcs1:libstrongswan
  pkcs8:libstrongswan x509:libstrongswan pubkey:libstrongswan kdf:libstrongswan
  hmac:libstrongswan sha1:libstrongswan sha2:libstrongswan aes:libstrongswan
  kernel-netlink:libstrongswan openssl:libstrongswan-standard-plugins
  gcm:libstrongswan-standard-plugins curve25519:libstrongswan-extra-plugins
  kernel-libipsec:libcharon-extra-plugins unity:libcharon-extra-plugins
  eap-identity:libcharon-extra-plugins eap-md5:libcharon-extra-plugins
  xauth-generic:libcharon-extauth-plugins eap-mschapv2:libcharon-extauth-plugins
  socket-default:strongswan-libcharon vici:strongswan-swanctl
)
PLUGIN_PACKAGES_trixie=(
  random:libstrongswan nonce:libstrongswan pem:libstrongswan pkcs1:libstrongswan
  pkcs8:libstrongswan x509:libstrongswan pubkey:libstrongswan kdf:libstrongswan-extra-plugins
  hmac:libstrongswan-extra-plugins sha1:libstrongswan-extra-plugins
  sha2:libstrongswan-extra-plugins aes:libstrongswan-extra-plugins
  kernel-netlink:libstrongswan openssl:libstrongswan
  gcm:libstrongswan-standard-plugins curve25519:libstrongswan-extra-plugins
  kernel-libipsec:libcharon-extra-plugins unity:libcharon-extra-plugins
  eap-identity:libcharon-extra-plugins eap-md5:libcharon-extra-plugins
  xauth-generic:libcharon-extauth-plugins eap-mschapv2:libcharon-extauth-plugins
  socket-default:strongswan-libcharon vici:strongswan-swanctl
)
# Every tool the demo, the tests and the benchmarks call.
TOOL_PACKAGES=(
  ip:iproute2 iptables:iptables ip6tables:iptables ipset:ipset tcpdump:tcpdump tshark:tshark
  ping:iputils-ping iperf3:iperf3 socat:socat vpnc:vpnc gcc:gcc swanctl:strongswan-swanctl
  ps:procps systemd-analyze:systemd git:git qemu-system-x86_64:qemu-system-x86
  debootstrap:debootstrap openvpn:openvpn perf:linux-perf haproxy:haproxy curl:curl
  openssl:openssl clang:clang dpkg-buildpackage:dpkg-dev dh:debhelper lintian:lintian
)
problems=()
# The build makes the extension optional (a deployment without a compiler still runs, on the
# Python path); this machine has gcc and the headers, so here a missing extension is an error.
native=$(.venv/bin/python -c 'from tcpencap.native import load; m, why = load(); print(why)' 2>&1) \
  || native="cannot import tcpencap.native: $native"
[ -z "$native" ] || problems+=("the native data path did not build ($native): gcc and python3-dev are needed, then rerun")
[ -x /usr/lib/ipsec/charon ] || problems+=("/usr/lib/ipsec/charon is missing: install strongswan-charon")
# scripts/fuzz-native.sh links its targets with libFuzzer and the sanitizers' runtimes: link a
# trivial one, since where the runtime lives differs by clang release (clang 19 names a
# per-target directory that Debian does not use).
probe=$(mktemp -d)
printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { return 0; }\n' >"$probe/probe.c"
clang -fsanitize=fuzzer,address,undefined "$probe/probe.c" -o "$probe/probe" 2>/dev/null \
  || problems+=("libFuzzer is missing: install libclang-rt-$(clang -dumpversion | cut -d. -f1)-dev")
rm -rf "$probe"
for entry in "${PLUGIN_PACKAGES[@]}"; do
  plugin=${entry%%:*} package=${entry#*:}
  [ -f "/usr/lib/ipsec/plugins/libstrongswan-$plugin.so" ] \
    || problems+=("strongSwan plugin '$plugin' is missing: install $package")
done
for entry in "${TOOL_PACKAGES[@]}"; do
  tool=${entry%%:*} package=${entry#*:}
  command -v "$tool" >/dev/null || problems+=("'$tool' is not on PATH: install $package")
done
if [ ${#problems[@]} -gt 0 ]; then
  printf 'setup: %s\n' "${problems[@]}" >&2
  exit 1
fi

echo "setup: done ($(.venv/bin/python --version), $(/usr/lib/ipsec/charon --version 2>/dev/null | head -1 || echo charon))"
