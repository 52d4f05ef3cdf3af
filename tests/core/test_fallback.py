from hypothesis import given, settings
from hypothesis import strategies as st

from tcpencap.core.fallback import FallbackMonitor, Switch


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


def test_zero_timeout_switches_on_first_sight_and_only_once():
    mon = FallbackMonitor()
    mon.add("home", ["198.19.0.2"], timeout=0.0)
    assert mon.update(7.0, [sa("home", "01", "CONNECTING")]) == [
        Switch("home", ("198.19.0.2",), True)
    ]
    assert mon.update(8.0, [sa("home", "01", "CONNECTING"), sa("home", "02", "CONNECTING")]) == []


def test_oldest_attempt_counts_and_a_dying_sa_keeps_tcp():
    mon = FallbackMonitor()
    mon.add("home", ["198.19.0.2"], timeout=4.0)
    assert mon.update(0.0, [sa("home", "01", "CONNECTING")]) == []
    both = [sa("home", "01", "CONNECTING"), sa("home", "02", "CONNECTING")]
    assert mon.update(3.0, both) == []
    assert mon.update(4.0, both) == [Switch("home", ("198.19.0.2",), True)]
    # any SA of the connection keeps it on TCP, whatever its state
    assert mon.update(50.0, [sa("home", "02", "DELETING")]) == []
    assert mon.update(51.0, []) == [Switch("home", ("198.19.0.2",), False)]


def test_back_on_udp_the_full_timeout_applies_again():
    mon = FallbackMonitor()
    mon.add("home", ["198.19.0.2"], timeout=5.0)
    mon.update(0.0, [sa("home", "01", "CONNECTING")])
    assert mon.update(5.0, [sa("home", "01", "CONNECTING")])[0].tcp is True
    assert mon.update(6.0, [])[0].tcp is False
    # the same SPI seen again: a new attempt, its clock starts now
    assert mon.update(7.0, [sa("home", "01", "CONNECTING")]) == []
    assert mon.update(11.9, [sa("home", "01", "CONNECTING")]) == []
    assert mon.update(12.0, [sa("home", "01", "CONNECTING")]) == [
        Switch("home", ("198.19.0.2",), True)
    ]


def test_connections_are_independent_and_junk_is_ignored():
    mon = FallbackMonitor()
    mon.add("a", ["198.19.0.2"], timeout=1.0)
    mon.add("b", ["198.19.0.3"], timeout=10.0)
    junk = {"a": "not a dict", "b": ["x"], "c": {"state": "CONNECTING"}}
    assert mon.update(0.0, [sa("a", "01", "CONNECTING"), sa("b", "02", "CONNECTING"), junk]) == []
    assert mon.update(1.0, [sa("a", "01", "CONNECTING"), sa("b", "02", "CONNECTING")]) == [
        Switch("a", ("198.19.0.2",), True)
    ]
    # "b" never took a non-dict for an SA: still on UDP, counting from 0.0; "a" has no SA left
    assert mon.update(10.0, [sa("b", "02", "CONNECTING")]) == [
        Switch("a", ("198.19.0.2",), False),
        Switch("b", ("198.19.0.3",), True),
    ]
    assert not mon.conns["a"].on_tcp and mon.conns["b"].on_tcp


def test_sa_without_initiator_spi_is_still_an_attempt():
    mon = FallbackMonitor()
    mon.add("home", ["198.19.0.2"], timeout=2.0)
    assert mon.update(0.0, [{"home": {"state": "CONNECTING"}}]) == []
    assert mon.update(2.0, [{"home": {"state": "CONNECTING"}}]) == [
        Switch("home", ("198.19.0.2",), True)
    ]


_TEXT = st.sampled_from(["01", "02", "CONNECTING", "ESTABLISHED", ""]) | st.text(max_size=4)
_VAL = _TEXT | st.lists(_TEXT, max_size=2) | st.dictionaries(_TEXT, _TEXT, max_size=2)
_SA = st.dictionaries(st.sampled_from(["state", "initiator-spi", "uniqueid"]), _VAL, max_size=3)
_ITEM = st.dictionaries(st.sampled_from(["home", "other"]), _SA | _VAL, max_size=2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_ITEM, max_size=3), max_size=6))
def test_update_never_raises_and_switches_alternate(steps):
    """list-sas values are str, lists or sections; none of them may stop the monitor."""
    mon = FallbackMonitor()
    mon.add("home", ["198.19.0.2"], timeout=3.0)
    on_tcp = False
    for i, sas in enumerate(steps):
        for sw in mon.update(2.0 * i, sas):
            assert sw.name == "home" and sw.tcp is not on_tcp
            on_tcp = sw.tcp
    assert mon.conns["home"].on_tcp is on_tcp
