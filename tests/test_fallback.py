from tcpencap.fallback import FallbackMonitor, Switch


def sa(name: str, spi: str, state: str) -> dict:
    return {name: {"initiator-spi": spi, "state": state}}


def test_switches_to_tcp_after_timeout_and_back_when_idle():
    mon = FallbackMonitor()
    mon.add("home", ["198.19.0.2"], timeout=5.0)
    assert mon.update(0.0, []) == []
    assert mon.update(1.0, [sa("home", "01", "CONNECTING")]) == []
    assert mon.update(5.9, [sa("home", "01", "CONNECTING")]) == []
    assert mon.update(6.0, [sa("home", "01", "CONNECTING")]) == [
        Switch("home", ("198.19.0.2",), True)
    ]
    # stays on TCP while an SA lives, no repeated switch
    assert mon.update(20.0, [sa("home", "01", "ESTABLISHED")]) == []
    assert mon.update(30.0, []) == [Switch("home", ("198.19.0.2",), False)]
    assert mon.update(31.0, []) == []


def test_answered_udp_never_switches():
    mon = FallbackMonitor()
    mon.add("home", ["198.19.0.2"], timeout=2.0)
    assert mon.update(0.0, [sa("home", "01", "CONNECTING")]) == []
    assert mon.update(1.0, [sa("home", "01", "ESTABLISHED")]) == []
    assert mon.update(100.0, [sa("home", "01", "ESTABLISHED")]) == []


def test_new_attempt_restarts_the_clock_and_other_connections_are_ignored():
    mon = FallbackMonitor()
    mon.add("home", ["198.19.0.2", "fd00:100::2"], timeout=3.0)
    assert mon.update(0.0, [sa("home", "01", "CONNECTING"), sa("other", "02", "CONNECTING")]) == []
    assert mon.update(2.0, []) == []  # attempt gone (charon gave up)
    assert mon.update(2.5, [sa("home", "03", "CONNECTING")]) == []
    assert mon.update(5.0, [sa("home", "03", "CONNECTING")]) == []
    switches = mon.update(5.5, [sa("home", "03", "CONNECTING")])
    assert switches == [Switch("home", ("198.19.0.2", "fd00:100::2"), True)]
