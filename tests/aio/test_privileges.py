"""privileges.keep_only under systemd: the unit's CapabilityBoundingSet= has already removed
every other capability, CAP_SETPCAP included, so nothing may be dropped again (found in the
VM lab: the daemon logged 'could not drop capabilities ... Operation not permitted')."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": REPO}

CHILD = """
import ctypes, ctypes.util
from tcpencap.aio import privileges as p
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
for cap in range(p._last_cap() + 1):  # what CapabilityBoundingSet= leaves
    if cap not in p.KEEP:
        libc.prctl(24, cap, 0, 0, 0)
mask = sum(1 << c for c in p.KEEP)  # and AmbientCapabilities=: no CAP_SETPCAP
header = p._Header(p._LINUX_CAPABILITY_VERSION_3, 0)
data = (p._Data * 2)()
data[0].effective = data[0].permitted = mask
assert libc.capset(ctypes.byref(header), data) == 0
p.keep_only()
print(hex(p.effective_caps()))
"""


def test_keep_only_inside_a_systemd_bounding_set() -> None:
    assert os.geteuid() == 0, "needs root (capabilities to give up)"
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout, 16) == (1 << 10) | (1 << 12) | (1 << 13), res.stdout


@pytest.mark.parametrize("cap", [0, 21])  # CAP_CHOWN, CAP_SYS_ADMIN
def test_keep_only_still_drops_what_the_bounding_set_has(cap: int) -> None:
    code = (
        "from tcpencap.aio import privileges as p; import ctypes, ctypes.util\n"
        "p.keep_only()\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        f"print(libc.prctl(23, {cap}, 0, 0, 0), hex(p.effective_caps()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    in_bounding, eff = res.stdout.split()
    assert in_bounding == "0" and not int(eff, 16) & (1 << cap), res.stdout


# What the unit does since issue 23: a dedicated user with AmbientCapabilities= and
# CapabilityBoundingSet= and SystemCallFilter=~@privileged, which denies capset (EPERM). The
# child stands in for that: setpriv gives the user and the sets, and capset is made to fail
# as the filter makes it fail.
UNIT_CHILD = """
import ctypes, errno, subprocess
from tcpencap.aio import privileges as p

class Filtered:  # libc with capset denied, as SystemCallFilter=~@privileged does
    def __init__(self, real):
        self.real = real
    def __getattr__(self, name):
        if name == "capset":
            def denied(*_a):
                ctypes.set_errno(errno.EPERM)
                return -1
            return denied
        return getattr(self.real, name)

real_cdll = ctypes.CDLL
p.ctypes.CDLL = lambda *a, **k: Filtered(real_cdll(*a, **k))
p.keep_only()
st = dict(l.split(":\\t", 1) for l in open("/proc/self/status") if ":\\t" in l)
print(st["Uid"].split()[0], st["CapEff"].strip(), st["CapAmb"].strip(), st["NoNewPrivs"].strip())
# iptables, as the daemon runs it for a peer that arrives later: needs the ambient set
print(subprocess.run(["iptables", "-w", "5", "-t", "mangle", "-N", "TE_PRIV"]).returncode)
"""


def test_keep_only_as_the_units_user_under_its_syscall_filter() -> None:
    """Fails on 96634d6: capset was called whatever the sets held, and the filter refused
    it ("could not drop capabilities"); and inheritable was cleared, taking the ambient set
    that iptables needs as a non-root user."""
    import shutil
    import tempfile
    import uuid

    for tool in ("setpriv", "iptables", "ip"):
        assert shutil.which(tool), f"{tool} is needed"
    ns = f"te-priv-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        caps = "+net_admin,+net_raw,+net_bind_service"
        argv = ["ip", "netns", "exec", ns, "setpriv", "--reuid=65534", "--regid=65534"]
        argv += ["--clear-groups", f"--inh-caps=-all,{caps}", f"--ambient-caps={caps}"]
        argv += [f"--bounding-set=-all,{caps}", sys.executable, "-c", UNIT_CHILD]
        # The unit's user reads the package; a checkout under /root (mode 0700) is not
        # readable by it, so the child gets a world-readable copy of the package.
        with tempfile.TemporaryDirectory() as copy:
            os.chmod(copy, 0o755)
            shutil.copytree(
                os.path.join(REPO, "tcpencap"),
                os.path.join(copy, "tcpencap"),
                ignore=shutil.ignore_patterns("__pycache__", "*.so"),
            )
            env = {**os.environ, "PYTHONPATH": copy}
            res = subprocess.run(argv, capture_output=True, text=True, cwd=copy, env=env)
        assert res.returncode == 0, res.stderr
        ident, eff, amb, nnp, ipt = res.stdout.split()
        kept = (1 << 10) | (1 << 12) | (1 << 13)
        assert (ident, int(eff, 16), int(amb, 16), nnp, ipt) == ("65534", kept, kept, "1", "0")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
