"""Keep only the capabilities the running daemon needs.

Once its sockets, queue and rules are set up tcpencap still needs: CAP_NET_ADMIN (iptables
rules and set members for peers that arrive later, IPsec bypass policies on new sockets,
NFQUEUE verdicts), CAP_NET_RAW (raw-socket injection, iptables) and CAP_NET_BIND_SERVICE (a
reload may add a listener on 443). Every other capability is dropped from the bounding,
permitted, effective and inheritable sets, so neither tcpencap nor the iptables it runs can
regain them; no-new-privileges is set too.

Under its systemd unit (a dedicated user, AmbientCapabilities=, CapabilityBoundingSet=) the
sets hold exactly these already, and ``capset`` is denied by SystemCallFilter=~@privileged:
nothing is changed then, only checked. Run by a non-root user the three stay inheritable
and ambient, since the iptables it executes needs them (root's children get them from the
bounding set instead).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
KEEP = (CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_NET_RAW)

_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def _own_sets() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread."""
    found = {}
    with open("/proc/thread-self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapInh"):
                found[key] = int(value.split()[0], 16)
    return found["CapEff"], found["CapPrm"], found["CapInh"]


def keep_only(keep: tuple[int, ...] = KEEP) -> None:
    """Drop every capability but ``keep``; raises OSError if the kernel refuses."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    for cap in range(_last_cap() + 1):
        # Under systemd's CapabilityBoundingSet= the others are gone already, and dropping
        # one that is still there needs CAP_SETPCAP, which such a unit does not grant.
        if cap in keep or libc.prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) == 0:
            continue
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != 22:  # EINVAL: capability unknown to this kernel
                raise OSError(err, f"PR_CAPBSET_DROP {cap}: {os.strerror(err)}")
    want = 0
    for cap in keep:
        want |= 1 << cap
    inheritable = want if os.geteuid() != 0 else 0  # keeps the ambient set (see above)
    if _own_sets() != (want, want, inheritable):
        header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_Data * 2)()
        for i in range(2):
            data[i].effective = data[i].permitted = (want >> (32 * i)) & 0xFFFFFFFF
            data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
        if libc.capset(ctypes.byref(header), data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"capset: {os.strerror(err)}")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"PR_SET_NO_NEW_PRIVS: {os.strerror(err)}")


def effective_caps(pid: int | str = "self") -> int:
    """CapEff of a process, from /proc (for status and tests)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0
