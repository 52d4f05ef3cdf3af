"""Network namespaces and their links, addresses and routes, over rtnetlink with pyroute2.

Namespaces are made and removed with ``pyroute2.netns`` (the same bind mount under
/run/netns that ``ip netns add`` makes, so ``ip netns`` and iptables see them); everything
inside one goes through a ``Netlink`` socket opened in that namespace. Programs still run
in a namespace through ``ip netns exec`` (``exec_argv``), which also gives them a private
mount namespace: charon's private /run relies on it. Every failure is a LabError that names
the namespace and the step.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator, Sequence

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from .process import LabError


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn what pyroute2 raises into a LabError naming the step: NetlinkError for a request
    the kernel refused, OSError for namespace files and sockets (TimeoutError is one), and
    RuntimeError when the child process that enters a namespace dies."""
    try:
        yield
    except LabError:
        raise
    except (NetlinkError, OSError, RuntimeError) as exc:
        raise LabError(f"{what}: {exc}") from exc


def create(name: str) -> None:
    """A new named network namespace (``ip netns add NAME``); LabError if it exists."""
    with _step(f"netns add {name}"):
        netns.create(name)


def remove(name: str) -> None:
    """Delete a named network namespace (``ip netns del NAME``)."""
    with _step(f"netns del {name}"):
        netns.remove(name)


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside namespace ``name``."""
    return ["ip", "netns", "exec", name, *argv]


class Netlink:
    """An rtnetlink socket inside one existing namespace; a context manager."""

    def __init__(self, name: str) -> None:
        self.name = name
        with _step(f"netlink socket in {name}"):
            # flags=0: a missing namespace is an error, never silently created
            self._ipr = IPRoute(netns=name, flags=0)

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def index(self, ifname: str) -> int:
        with _step(f"{self.name}: link show {ifname}"):
            found = self._ipr.link_lookup(ifname=ifname)
        if not found:
            raise LabError(f"{self.name}: no link {ifname}")
        return int(found[0])

    def add_veth(self, ifname: str, peer: str, peer_netns: str) -> None:
        """A veth pair: ``ifname`` in this namespace, ``peer`` made directly in ``peer_netns``."""
        with _step(f"{self.name}: link add {ifname} type veth peer {peer} netns {peer_netns}"):
            self._ipr.link(
                "add", ifname=ifname, kind="veth", peer={"ifname": peer, "net_ns_fd": peer_netns}
            )

    def up(self, ifname: str) -> None:
        index = self.index(ifname)
        with _step(f"{self.name}: link set {ifname} up"):
            self._ipr.link("set", index=index, state="up")

    def add_address(self, ifname: str, interface: str) -> None:
        """Add ``ADDR/LEN`` to ``ifname``. IPv6 addresses skip duplicate address detection
        (``nodad``), so they are usable at once: set the link up first."""
        iface = ipaddress.ip_interface(interface)
        index = self.index(ifname)
        extra = {"flags": IFA_F_NODAD} if iface.version == 6 else {}
        with _step(f"{self.name}: addr add {interface} dev {ifname}"):
            self._ipr.addr(
                "add",
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                **extra,
            )

    def add_default_route(self, gateway: str) -> None:
        """``ip route add default via GATEWAY`` (IPv4 or IPv6, from the gateway's family)."""
        version = ipaddress.ip_address(gateway).version
        family, dst = (socket.AF_INET, "0.0.0.0") if version == 4 else (socket.AF_INET6, "::")
        with _step(f"{self.name}: route add default via {gateway}"):
            self._ipr.route("add", family=family, dst=dst, dst_len=0, gateway=gateway, proto="boot")
