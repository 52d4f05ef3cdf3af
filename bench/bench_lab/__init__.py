"""End-to-end lab benchmark: the same libipsec tunnel over plain UDP, over RFC 9329 TCP and
over Cisco cTCP, beside OpenVPN over TCP and a socat relay, all in one lab and one run.

Not a test: it prints figures next to a baseline measured in the same run and never asserts
on timings. Run as root from the checkout's root::

    python3 -m bench.bench_lab [--duration 10] [--scale 100,500,1000] [--json PATH] [--keep]
        [--datapath native,python] [--phases udp,tcp,tls,ctcp,openvpn,socat,floor]

One lab (c1 - fw - gw, see tests/labkit/) is built. Phase "udp": charon to charon over UDP,
nothing blocked, no tcpencap: the baseline. From then on fw drops all UDP of c1. Phases
"tcp" (RFC 9329), "tls" (RFC 9329 over TLS 1.3 on 443, Appendix A) and "ctcp" (Cisco
cTCP): tcpencap runs on both ends, once per
``--datapath`` (written as ``datapath = X`` into both tcpencap.conf; "" writes no key).
Each of these measures inner TCP throughput (iperf3, 1 and 4 streams), inner ping RTT, an
inner UDP flood (packets/s and loss), CPU seconds per GB of charon and tcpencap, IKE_SA +
CHILD_SA set-up time; udp and tcp also N concurrent childless IKE SAs from c1 (set-up rate,
tcpencap memory per connection). Phase "openvpn" (bench/openvpn_lab.py): OpenVPN 2.6 over
TCP between the same hosts, with defaults and with --tcp-nodelay: throughput, ping, CPU per
GB of both openvpn processes. Phase "socat": the same iperf3 traffic through a pair of socat
TCP relays (c1 and gw), the C floor for a user-space relay's CPU per GB. Phase "floor":
bench/hop_floor.py's round-trip floor of user-space relays.

Modules, one job each: ``cli`` (the options, the run, the report and the JSON file),
``phases`` (the lab and its phases, in order), ``traffic`` (throughput, flood, ping, set-up
time), ``scale`` (the gateway scale test), ``confs`` (swanctl, charon and tcpencap texts),
``procs`` (machine facts, CPU and memory of watched processes), ``report`` (the tables) and
``common`` (names, ports, the progress line).
"""
