"""privileges.keep_only under systemd: the unit's CapabilityBoundingSet= has already removed
every other capability, CAP_SETPCAP included, so nothing may be dropped again (found in the
VM lab: the daemon logged 'could not drop capabilities ... Operation not permitted')."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
