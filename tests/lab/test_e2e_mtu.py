"""End to end: packet sizes through RFC 9329 and cTCP on 1500- and 1280-octet links.

Every inner ping either arrives, or is refused with ping's own "message too long" error, or
makes a tcpencap counter go up (docs/mtu.md): nothing vanishes unseen. A 5 MB inner TCP
transfer completes, and IKEv2 with a 4096-bit RSA chain (CA, intermediate, peer) and IKE
fragmentation off comes up; over cTCP its IKE_AUTH messages leave as outer IP fragments,
which the peer's kernel reassembles before the cTCP queue (also shown with scapy).
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.labkit import (
    Host,
    Lab,
    Pki,
    cert_conf,
    charon_version,
    ike_id,
    psk_conf,
    tcpencap_conf,
    write_pki,
)
from tests.labkit.e2e import listen_addr

pytestmark = pytest.mark.lab
NAME = "c1-gw"
CTCP_PORT = 10000
# ping payload sizes: small, around the 1280-link limits, around libipsec's 1400 TUN MTU
SIZES = (64, 512, 1000, 1180, 1200, 1216, 1232, 1252, 1300, 1340, 1360, 1372, 1373, 1400, 1472)
PINGS = 2  # echo replies each _ping waits for
TOO_LONG = re.compile(r"message too long|frag needed", re.I)
# Per ESP transform (swanctl proposal): list-sas' name for its cipher, an outer link MTU and
# the largest libipsec TUN MTU whose full-size packets cross cTCP over IPv4 on that link whole
# (docs/mtu.md's table). libipsec reads its TUN device with a buffer of the MTU it created it
# with (1400), so a larger TUN MTU loses packets: AES-GCM's limit on a 1500 link (1402) is out
# of reach, its 1280 row is shown instead.
ESP_TRANSFORMS = {
    "aes128-sha256": ("AES_CBC", 1500, 1390),  # 1390 -> 1464 as ESP-in-UDP -> 1500 as cTCP
    "aes128gcm16": ("AES_GCM_16", 1280, 1182),  # 1182 -> 1244 -> 1280
}


def default_esp_proposal() -> str:
    """What ``esp_proposals = default`` (the lab's configs) negotiates between two charons of
    the installed release. strongSwan 5.9 puts AES-CBC/SHA-2 first when the keyword is
    written out (AES-GCM first only when the option is absent); 6.0 puts AES-GCM first in
    both cases. strongSwan's change, harmless: tcpencap plans against the path MTU, whatever
    the transform."""
    return "aes128-sha256" if charon_version() < (6,) else "aes128gcm16"


def _encr_algs(host: Host) -> set[str]:
    """The ciphers of ``host``'s CHILD_SAs, as list-sas names them."""
    return {
        child["encr-alg"]
        for sa in host.charon.list_sas()  # type: ignore[union-attr]
        for ike in sa.values()
        for child in ike.get("child-sas", {}).values()
    }


def _no_ike_fragmentation(conf: str) -> str:
    assert "    encap = yes\n" in conf
    return conf.replace("    encap = yes\n", "    encap = yes\n    fragmentation = no\n", 1)


def _set_mtu(lab: Lab, mtu: int) -> None:
    """All four veth ends of the c1 - fw - gw path."""
    for h in (lab.clients[0], lab.gw):
        h.run("ip", "link", "set", "dev", str(h.veth), "mtu", str(mtu))
        lab.fw.run("ip", "link", "set", "dev", str(h.fw_veth), "mtu", str(mtu))


def _start_ctcp(lab: Lab, conf: dict[Host, str], family: int = 4) -> None:
    c1, gw = lab.clients[0], lab.gw
    lab.block_udp(c1)
    for h in (c1, gw):
        h.start_charon()
        h.charon.load(conf[h])  # type: ignore[union-attr]
    gw.start_tcpencap(
        f"tcpencap {{\n  status_socket = {gw.dir}/tcpencap.ctl\n"
        f"  vici_socket = {gw.charon.uri}\n"  # type: ignore[union-attr]
        f"  gateway {{\n    ctcp_listen = {listen_addr(gw, family, CTCP_PORT)}\n  }}\n}}\n"
    )
    c1.start_tcpencap(
        f"tcpencap {{\n  status_socket = {c1.dir}/tcpencap.ctl\n"
        f"  vici_socket = {c1.charon.uri}\n"  # type: ignore[union-attr]
        f"  connections {{\n    {NAME} {{\n      encapsulation = ctcp\n    }}\n  }}\n}}\n"
    )


def _setup(lab: Lab, encap: str, conf: dict[Host, str] | None = None, family: int = 4) -> None:
    c1, gw = lab.clients[0], lab.gw
    conf = conf or {
        c1: _no_ike_fragmentation(psk_conf(c1, gw, family=family)),
        gw: _no_ike_fragmentation(psk_conf(gw, c1, family=family)),
    }
    if encap == "ctcp":
        _start_ctcp(lab, conf, family)
    else:
        lab.block_udp(c1)
        for h in (c1, gw):
            h.start_charon()
            h.charon.load(conf[h])  # type: ignore[union-attr]
        gw.start_tcpencap(tcpencap_conf(gw, listen=[listen_addr(gw, family, 4500)]))
        c1.start_tcpencap(tcpencap_conf(c1, connections={NAME: 4500}))
    c1.charon.initiate(NAME, timeout=10)  # type: ignore[union-attr]


def _signals(host: Host) -> int:
    """Sum of every counter and drop count in ``tcpencap status``."""

    def walk(obj: Any, inside: bool) -> int:
        if isinstance(obj, dict):
            return sum(
                walk(v, inside or k in ("counters", "drops")) for k, v in obj.items()
            )  # fmt: skip
        if isinstance(obj, list):
            return sum(walk(v, inside) for v in obj)
        return obj if inside and isinstance(obj, int) and not isinstance(obj, bool) else 0

    return walk(host.tcpencap_status(), False)


def _ping(src: Host, dst: str, size: int, df: bool) -> tuple[int, int, str]:
    """(sent, received, output) of PINGS echo requests. With ``-w``, ping sends until PINGS
    replies are in or the deadline passes: on a slow host one more request can leave before
    the last reply is back, so PINGS received (not received == sent) means all arrived."""
    argv = ["ping", "-n", "-c", str(PINGS), "-i", "0.1", "-W", "1", "-w", "3", "-s", str(size)]
    argv += ["-M", "do" if df else "dont", "-I", src.inner(4), dst]
    proc = src.run(*argv, check=False, timeout=10)
    text = proc.stdout + proc.stderr
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    assert m, text
    return int(m.group(1)), int(m.group(2)), text


def _check_pings(lab: Lab) -> dict[str, int]:
    """Every size with and without DF; a lost ping must have moved a counter since the
    previous loss (status is read only around losses: each read costs a CLI start)."""
    c1, gw = lab.clients[0], lab.gw
    outcome = {"arrived": 0, "too-long": 0, "counted": 0}
    seen = _signals(c1) + _signals(gw)
    for df in (True, False):
        for size in SIZES:
            _, got, text = _ping(c1, gw.inner(4), size, df)
            if got == PINGS:
                outcome["arrived"] += 1
                continue
            if TOO_LONG.search(text):
                assert df, f"size {size} without DF refused: {text}"
                outcome["too-long"] += 1
                continue
            now = _signals(c1) + _signals(gw)
            assert now > seen, f"size {size} DF={df} lost without a counter: {text}"
            seen = now
            outcome["counted"] += 1
    # without DF every size arrives (fragmented where needed); with DF at most the sizes
    # above libipsec's TUN MTU are refused by ping and a few are answered by ICMP
    assert outcome["arrived"] >= len(SIZES) + len(SIZES) // 2, outcome
    assert outcome["too-long"] <= 3, outcome
    return outcome


_TRANSFER = r"""
import hashlib, socket, sys, threading
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "server":
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port)); srv.listen(1); print("listening", flush=True)
    s, _ = srv.accept(); h = hashlib.sha256(); n = 0
    while chunk := s.recv(65536):
        h.update(chunk); n += len(chunk)
    s.sendall(f"{n} {h.hexdigest()}".encode()); s.close()
else:
    data = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    s = socket.create_connection((addr, port), timeout=60)
    s.sendall(data); s.shutdown(socket.SHUT_WR)
    reply = s.recv(200).decode()
    print(reply, hashlib.sha256(data).hexdigest(), len(data))
"""


def _check_transfer(lab: Lab) -> None:
    c1, gw = lab.clients[0], lab.gw
    server = gw.spawn([sys.executable, "-c", _TRANSFER, "server", gw.inner(4), "5201"], "xfer.log")
    server.wait_for_log("listening", timeout=5)
    out = c1.run(sys.executable, "-c", _TRANSFER, "client", gw.inner(4), "5201", timeout=90)
    n, digest, want_digest, want_n = out.stdout.split()
    assert (int(n), digest) == (int(want_n), want_digest), out.stdout


@pytest.mark.parametrize(
    ("encap", "mtu", "family"),
    [
        ("rfc9329", 1500, 4),
        ("rfc9329", 1280, 4),
        ("ctcp", 1500, 4),
        ("ctcp", 1280, 4),
        ("ctcp", 1500, 6),
        ("ctcp", 1280, 6),
    ],
)
def test_ping_sizes_and_transfer(encap: str, mtu: int, family: int) -> None:
    """``family`` is the outer one; pings and the transfer use the inner IPv4 addresses."""
    with Lab(clients=1) as lab:
        _set_mtu(lab, mtu)
        _setup(lab, encap, family=family)
        assert _encr_algs(lab.clients[0]) == {ESP_TRANSFORMS[default_esp_proposal()][0]}
        outcome = _check_pings(lab)
        _check_transfer(lab)
        st = lab.clients[0].tcpencap_status()
        if encap == "ctcp":
            counters = st["ctcp"]["counters"]
            assert not counters.get("send-failed"), counters
            if mtu == 1280:  # ESP-in-UDP of a 1300-octet ping cannot fit 1280 whole
                key = "fragmented" if family == 4 else "fragmented6"
                assert counters.get(key, 0) > 0, counters
            if family == 6 and mtu == 1500:  # 1464 >= 1280: the kernel is told
                assert counters.get("icmp-too-big-sent", 0) > 0, counters
        print(encap, mtu, family, outcome, json.dumps(st.get("ctcp")))


@pytest.mark.parametrize("fragments", [False, True])
@pytest.mark.parametrize("esp", list(ESP_TRANSFORMS))
def test_documented_libipsec_mtu_for_ctcp(esp: str, fragments: bool) -> None:
    """docs/mtu.md: the largest libipsec TUN MTU whose full-size packets cross cTCP over IPv4
    whole, per ESP transform and link MTU; one octet more and the first DF packet is
    answered by ICMP, later ones are fragmented. The transform is pinned: what ``default``
    negotiates differs between strongSwan 5.9 and 6.0 (default_esp_proposal). kernel-libipsec
    has no MTU setting in either (its TUN device is created with 1400), so the device is
    changed directly."""
    cipher, link_mtu, largest = ESP_TRANSFORMS[esp]
    tun_mtu = largest + fragments
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        _set_mtu(lab, link_mtu)
        conf = {
            c1: _no_ike_fragmentation(psk_conf(c1, gw, esp_proposals=esp)),
            gw: _no_ike_fragmentation(psk_conf(gw, c1, esp_proposals=esp)),
        }
        _setup(lab, "ctcp", conf)
        assert _encr_algs(c1) == {cipher}
        for h in (c1, gw):
            h.run("ip", "link", "set", "dev", "ipsec0", "mtu", str(tun_mtu))
        _, got, text = _ping(c1, gw.inner(4), tun_mtu - 28, df=True)
        if fragments:  # charon's packet has DF and is too big for cTCP: answered by ICMP
            assert c1.tcpencap_status()["ctcp"]["counters"].get("too-big-df", 0) >= 1
            _, got, text = _ping(c1, gw.inner(4), tun_mtu - 28, df=True)
        assert got == PINGS, text
        _check_transfer(lab)
        counters = c1.tcpencap_status()["ctcp"]["counters"]
        assert bool(counters.get("too-big-df")) == fragments, counters
        assert (counters.get("fragmented", 0) > 0) == fragments, counters


# --- 4096-bit RSA chain, IKE fragmentation off ---------------------------------------


def _rsa_cert(identity: str, issuer: Pki | None, ca: bool, directory: Path, stem: str) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)])
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), False)
    if issuer is not None:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    cert = b.sign(issuer.key if issuer else key, hashes.SHA256())
    return write_pki(identity, directory, stem, cert, key)


@pytest.fixture(scope="module")
def rsa_chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pki]:
    d = tmp_path_factory.mktemp("pki4096")
    root = _rsa_cert("tcpencap lab root", None, True, d, "root")
    im = _rsa_cert("tcpencap lab intermediate", root, True, d, "im")
    return {
        "root": root,
        "im": im,
        "c1": _rsa_cert("c1.lab.test", im, False, d, "c1"),
        "gw": _rsa_cert("gw.lab.test", im, False, d, "gw"),
    }


def _chain_conf(local: Host, remote: Host, chain: dict[str, Pki]) -> str:
    conf = cert_conf(local, remote, chain[local.role], chain["root"])
    assert ike_id(local) == chain[local.role].identity
    # the intermediate is loaded as a CA so charon sends it and can verify the peer's chain
    root = str(chain["root"].cert_path)
    conf = conf.replace(f"cacerts = {root}", f"cacerts = {root},{chain['im'].cert_path}")
    return _no_ike_fragmentation(conf)


@pytest.mark.parametrize("encap", ["rfc9329", "ctcp"])
def test_ike_with_4096_bit_rsa_chain_without_ike_fragmentation(
    encap: str, rsa_chain: dict[str, Pki]
) -> None:
    with Lab(clients=2) as lab:
        c1, gw = lab.clients[0], lab.gw
        conf = {c1: _chain_conf(c1, gw, rsa_chain), gw: _chain_conf(gw, c1, rsa_chain)}
        cap = lab.capture(c1)
        _setup(lab, encap, conf)
        packets = cap.stop()
        sas = c1.charon.list_sas()  # type: ignore[union-attr]
        sa = [s[NAME] for s in sas if NAME in s]
        assert sa and sa[0]["state"] == "ESTABLISHED", sas
        log = c1.charon.log.read_text(errors="replace")  # type: ignore[union-attr]
        sizes = [int(n) for n in re.findall(r"sending packet: .*\((\d+) bytes\)", log)]
        # IKE_AUTH carries a 4096-bit certificate and signature, whole (no IKE fragments)
        assert max(sizes) > 2000, sizes
        assert "sending encrypted fragment" not in log, "IKE fragmentation was used"
        assert 'using trusted intermediate ca certificate "CN=tcpencap lab intermediate"' in log
        assert 'certificate "CN=gw.lab.test" key: 4096 bit RSA' in log
        from scapy.layers.inet import IP

        frags = [p for p in packets if IP in p and (p[IP].flags.MF or p[IP].frag)]
        if encap == "ctcp":
            # the big IKE_AUTH messages crossed as outer IPv4 fragments, both directions
            assert {p[IP].src for p in frags} == {c1.outer4, gw.outer4}, len(frags)
            counters = c1.tcpencap_status()["ctcp"]["counters"]
            assert counters.get("fragmented", 0) >= 1, counters
            _fragmented_syn(lab)
        else:
            assert not frags, "RFC 9329 is a TCP stream: the kernel segments, never fragments"


_FRAG_SYN = textwrap.dedent(
    r"""
    import json, sys
    from scapy.all import IP, TCP, conf, fragment, send, sniff, AsyncSniffer
    conf.verb = 0
    dst, port = sys.argv[1], int(sys.argv[2])
    syn = IP(dst=dst, id=4242) / TCP(sport=40100, dport=port, flags="S", seq=777,
                                     options=[("MSS", 1400), ("NOP", None)] * 4)
    sn = AsyncSniffer(filter=f"tcp and src host {dst} and port 40100", count=1)
    sn.start()
    import time; time.sleep(0.3)
    frags = fragment(syn, fragsize=16)
    assert len(frags) >= 3, len(frags)
    for f in frags:
        send(f)
    sn.join(timeout=3)
    got = sn.stop() if sn.running else sn.results
    print(json.dumps([int(p[TCP].flags) for p in got] if got else []))
    """
)


def _fragmented_syn(lab: Lab) -> None:
    """A SYN split into 16-octet IP fragments from c2 still draws the gateway's SYN-ACK:
    the kernel reassembles before the raw-table NFQUEUE rule hands it to the shim."""
    c2, gw = lab.clients[1], lab.gw
    out = c2.run(sys.executable, "-c", _FRAG_SYN, str(gw.outer4), str(CTCP_PORT), timeout=30)
    flags = json.loads(out.stdout)
    assert flags and flags[0] & 0x12 == 0x12, (flags, out.stderr)
