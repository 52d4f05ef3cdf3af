"""Lab harness: real strongSwan charon instances in network namespaces.

Test-side code, never installed with the daemon: used by the integration tests, the VM lab's
guest scenarios, the demo (``python -m tests.labkit.demo`` from the checkout) and the benchmarks.
Needs root, iproute2 (``ip netns exec``), iptables, tcpdump, ping, strongSwan 5.9 (charon with
kernel-libipsec, swanctl) and the ``test`` extra (pyroute2, cryptography, scapy).

Modules, one job each: ``process`` (commands and tracked processes, LabError), ``netns``
(namespaces, veth links, addresses, routes over rtnetlink with pyroute2), ``topology`` (Lab
and Host), ``charon`` (charon and its VICI handle), ``configs`` (swanctl.conf and
tcpencap.conf texts), ``pki`` (certificates), ``capture`` (tcpdump and scapy); ``e2e``
(set-ups and checks the lab tests share, imported from there, not re-exported here).

Topology (names unique per run, prefix ``te`` + 6 hex digits)::

    c1 (198.18.1.2, fd00:1::2) --+
    c2 (198.18.2.2, fd00:2::2) --+-- fw (.1 / ::1 on every link, forwards) -- gw (198.19.0.2,
    ...                          |                                             fd00:100::2)

Client ``i`` has inner (tunnel) addresses 198.18.{200+i}.1/32 and fd00:{200+i}::1/128, the
gateway 198.19.200.1/32 and fd00:200::1/128, all on ``lo`` (this kernel has no dummy links).

API::

    with Lab(clients=2, workdir=None, keep=False, ipsec="libipsec") as lab:  # or "kernel"
        # lab.dir: a new temp dir (removed unless keep) or workdir (never removed);
        # lab.prefix: 'te' + 6 hex; lab.fw, lab.gw: Host; lab.clients: list[Host];
        # lab.hosts: [fw, gw, *clients]; lab.processes, lab.rules: what teardown undoes
        lab.block_udp(host) / lab.unblock_udp(host)  # fw FORWARD: DROP -i/-o host's fw veth,
                                                     # -p udp, iptables and ip6tables
        cap = lab.capture(host, iface=None)          # tcpdump on host.veth, already listening
        cap.stop() -> list of scapy packets; cap.count_udp_ike(); cap.count_tcp(port); cap.pcap
    Host: name (netns), role ('fw'|'gw'|'c1'..), dir, outer4, outer6, inner4, inner6,
          veth (its end of the link to fw), fw_veth (fw's end), charon (after start_charon);
          outer(family) / inner(family) -> str
          run(*argv, check=True, timeout=30, input=None) -> CompletedProcess[str]
          spawn(argv, log_name, env=None, cwd=None) -> Process   # ip netns exec, own session,
                                                                 # stdout+stderr -> dir/log_name
          start_charon(plugins_extra=(), settings="") -> Charon  # settings: extra text inside
                                                                 # charon { }; VICI answers
          start_tcpencap(conf_text, log_level="debug") -> Process; tcpencap_status() -> dict
    Process: pid, argv, log, popen; alive(), log_text(), log_tail(n=30),
          wait_for_log(substring, timeout=5.0), stop(timeout=3.0) (TERM, then KILL)
    Charon: host, dir, vici_socket (Path), uri ('unix://...'), log (Path), process;
          session(timeout=None) -> vici.Session      # a new connection each call
          load(swanctl_conf_text, reset=False)       # accumulates texts, swanctl --load-all
          initiate(child, ike=None, timeout=5.0)     # CharonError (with log tail) on failure
          terminate(ike, timeout=5.0); list_sas() -> [{ike_name: sa}] (str values); log_tail()
    psk_conf(local, remote, family=4, psk=..., name=None, mobike=True, remote_port=None,
             proposals="default", esp_proposals="default") -> str
    cert_conf(local, remote, cert, ca, family=4, remote_id=None, name=None, mobike=True,
              remote_port=None, proposals="default", esp_proposals="default") -> str
        # config for `local`; conn and child name default_name(a, b) ('c1-gw' on both
        # sides); identities ike_id(host) ('c1.lab.test'); TS = both inner /32 and /128
    tcpencap_conf(host, listen=(), connections=None, extra="", gateway_extra="") -> str
    make_ca(directory, kind="ecdsa"|"rsa", name=...) -> Pki(identity, cert_path, key_path, ...)
    make_cert(ca, identity, directory, kind="ecdsa") -> Pki   # SAN = identity (DNS/IP/email)
    write_pki(identity, directory, stem, cert, key) -> Pki    # PEM files of your own objects
    ping(host, dst, src=None, count=3, interval=0.05, timeout=3.0) -> (sent, received)
    unanswered(host, dst, src=None, count=3, ...) -> [seq]  # of the first count, no reply
    vici_to_str(obj)                                 # vici's bytes to str, recursively
    charon_version() -> (6, 0, 1)                    # the installed charon's release
    LabError, CharonError(LabError)
"""

from .capture import Capture
from .charon import (
    BASE_PLUGINS,
    CHARON,
    IPSEC_BACKENDS,
    OPTIONAL_PLUGINS,
    Charon,
    CharonError,
    charon_version,
    vici_to_str,
)
from .configs import cert_conf, default_name, ike_id, psk_conf, tcpencap_conf
from .pki import Pki, make_ca, make_cert, write_pki
from .process import LabError, Process
from .topology import REPO_ROOT, Host, Lab, ping, unanswered

__all__ = [
    "BASE_PLUGINS",
    "CHARON",
    "IPSEC_BACKENDS",
    "OPTIONAL_PLUGINS",
    "REPO_ROOT",
    "Capture",
    "Charon",
    "CharonError",
    "Host",
    "Lab",
    "LabError",
    "Pki",
    "Process",
    "cert_conf",
    "charon_version",
    "default_name",
    "ike_id",
    "make_ca",
    "make_cert",
    "ping",
    "psk_conf",
    "tcpencap_conf",
    "unanswered",
    "vici_to_str",
    "write_pki",
]
