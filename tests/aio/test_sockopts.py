"""Tests for the per-socket IPsec bypass: the policy blob's layout is checked against the
kernel's own header (compiled with gcc) and the policies against what the kernel lists.

The kernel part runs in a private network namespace so that no other socket policy
(charon's, another test's) is counted. Needs root and gcc; fails loudly without them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tcpencap.aio import sockopts

REPO = Path(__file__).resolve().parents[2]

OFFSETS_C = r"""
#include <stddef.h>
#include <stdio.h>
#include <netinet/in.h>
#include <linux/in6.h>
#include <linux/xfrm.h>
int main(void) {
    printf("size %zu\n", sizeof(struct xfrm_userpolicy_info));
    printf("family %zu\n", offsetof(struct xfrm_userpolicy_info, sel.family));
    printf("dir %zu\n", offsetof(struct xfrm_userpolicy_info, dir));
    printf("action %zu\n", offsetof(struct xfrm_userpolicy_info, action));
    printf("ip_opt %d\n", IP_XFRM_POLICY);
    printf("ipv6_opt %d\n", IPV6_XFRM_POLICY);
    printf("in %d\nout %d\nallow %d\n", XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_POLICY_ALLOW);
    return 0;
}
"""


@pytest.fixture(scope="module")
def kernel_abi(tmp_path_factory) -> dict[str, int]:
    """Sizes, offsets and constants from <linux/xfrm.h>, as the C compiler sees them."""
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to read struct xfrm_userpolicy_info from <linux/xfrm.h>"
    d = tmp_path_factory.mktemp("xfrm_abi")
    (d / "abi.c").write_text(OFFSETS_C)
    subprocess.run([gcc, "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_constants_match_the_kernel_headers(kernel_abi):
    assert sockopts.IP_XFRM_POLICY == kernel_abi["ip_opt"]
    assert sockopts.IPV6_XFRM_POLICY == kernel_abi["ipv6_opt"]
    assert sockopts.XFRM_POLICY_IN == kernel_abi["in"]
    assert sockopts.XFRM_POLICY_OUT == kernel_abi["out"]
    assert sockopts.XFRM_POLICY_ALLOW == kernel_abi["allow"]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("direction", [sockopts.XFRM_POLICY_IN, sockopts.XFRM_POLICY_OUT])
def test_policy_blob_layout(kernel_abi, family, direction):
    blob = sockopts._policy(int(family), direction)
    assert kernel_abi["size"] == 168
    assert len(blob) == kernel_abi["size"]
    fam = kernel_abi["family"]
    assert int.from_bytes(blob[fam : fam + 2], sys.byteorder) == family
    assert blob[kernel_abi["dir"]] == direction
    assert blob[kernel_abi["action"]] == kernel_abi["allow"]
    # Everything else is zero: wildcard selector, no lifetimes, priority 0, index 0.
    rest = bytearray(blob)
    rest[fam : fam + 2] = b"\x00\x00"
    rest[kernel_abi["dir"]] = 0
    assert rest == bytearray(len(blob))


def test_the_two_directions_differ_only_in_dir(kernel_abi):
    a = sockopts._policy(socket.AF_INET6, sockopts.XFRM_POLICY_IN)
    b = sockopts._policy(socket.AF_INET6, sockopts.XFRM_POLICY_OUT)
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    assert diff == [kernel_abi["dir"]]


# In the namespace: set the bypass on fresh TCP sockets, list the kernel's socket policies.
NS_SCRIPT = r"""
import json, socket, subprocess, sys
from tcpencap.aio.sockopts import set_ipsec_bypass

def policies():
    out = subprocess.run(["ip", "xfrm", "policy"], capture_output=True, text=True, check=True)
    return out.stdout

result = {"before": policies()}
s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
set_ipsec_bypass(s4)
result["v4"] = policies()
s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
set_ipsec_bypass(s6)
result["both"] = policies()
s4.close()
s6.close()
result["closed"] = policies()
print(json.dumps(result))
"""


def _policy_heads(listing: str) -> list[str]:
    """'src .. dst ..' + 'socket in|out ..' pairs of `ip xfrm policy`, one string each."""
    lines = [ln.strip() for ln in listing.splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        if ln.startswith("socket "):
            out.append(f"{lines[i - 1]} | {ln.split()[0]} {ln.split()[1]}")
    return sorted(out)


def test_set_ipsec_bypass_installs_allow_policies_both_ways_in_a_namespace():
    assert os.geteuid() == 0, "needs root (CAP_NET_ADMIN) for network namespaces"
    assert shutil.which("ip"), "iproute2 (ip) is needed"
    ns = f"te-sockopt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", NS_SCRIPT],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert _policy_heads(res["before"]) == []
    v4 = ["src 0.0.0.0/0 dst 0.0.0.0/0 | socket in", "src 0.0.0.0/0 dst 0.0.0.0/0 | socket out"]
    v6 = ["src ::/0 dst ::/0 | socket in", "src ::/0 dst ::/0 | socket out"]
    assert _policy_heads(res["v4"]) == v4
    assert _policy_heads(res["both"]) == sorted(v4 + v6)
    # ALLOW: iproute2 names the action only when it is not allow.
    assert "block" not in res["both"]
    # Socket policies die with their socket.
    assert _policy_heads(res["closed"]) == []


def test_set_ipsec_bypass_on_plain_tcp_sockets():
    """No exception on either family, the same call the daemon makes on its connections."""
    assert os.geteuid() == 0, "needs root (CAP_NET_ADMIN) for IP_XFRM_POLICY"
    for family in (socket.AF_INET, socket.AF_INET6):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            sockopts.set_ipsec_bypass(s)
            sockopts.set_nodelay(s)
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_the_kernel_rejects_a_blob_with_a_wrong_family():
    """The kernel checks the selector's family: proof the offset used is the one it reads."""
    assert os.geteuid() == 0, "needs root (CAP_NET_ADMIN) for IP_XFRM_POLICY"
    blob = bytearray(sockopts._policy(socket.AF_INET, sockopts.XFRM_POLICY_OUT))
    blob[sockopts._FAMILY_OFFSET : sockopts._FAMILY_OFFSET + 2] = b"\x00\x00"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(OSError):
            s.setsockopt(socket.IPPROTO_IP, sockopts.IP_XFRM_POLICY, bytes(blob))
        s.setsockopt(
            socket.IPPROTO_IP,
            sockopts.IP_XFRM_POLICY,
            sockopts._policy(socket.AF_INET, sockopts.XFRM_POLICY_OUT),
        )
