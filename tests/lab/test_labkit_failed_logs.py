"""A failed lab leaves its logs where someone can read them: Lab copies its directory under
$TCPENCAP_LAB_FAILED_LOGS (the guest sets it to its results folder), and the host's report
of a failed guest test prints the charon and tcpencap log tails from there. Without this, a
test that fails once in CI's VM lab leaves nothing to diagnose it with."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from tests.labkit import Lab

sys.path.insert(0, str(Path(__file__).parents[1] / "vm"))
import guest  # noqa: E402  (tests/vm is not a package)

TEST = "tests/vm/kernel_scenarios.py::test_rekeys_under_ping[ctcp] (call)"


def lab_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lab:
    """A lab (never started) with logs in its directory, as the guest's test run sees it."""
    monkeypatch.setenv("TCPENCAP_LAB_FAILED_LOGS", str(tmp_path / "results" / "labs"))
    monkeypatch.setenv("PYTEST_CURRENT_TEST", TEST)
    lab = Lab(clients=1, workdir=tmp_path / "lab")
    lab.dir.mkdir()
    fill(lab)
    return lab


def fill(lab: Lab) -> None:
    for role, line in (("c1", "c1 says hello"), ("gw", "gw says hello")):
        (lab.dir / role / "charon").mkdir(parents=True)
        (lab.dir / role / "charon" / "charon.log").write_text(f"{line}\n" * 100)
        (lab.dir / role / "tcpencap.log").write_text("tcpencap running\nlast line\n")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(lab.dir / "gw" / "charon" / "charon.vici"))  # a socket cannot be copied
    sock.close()


def test_a_failed_lab_keeps_its_logs_and_the_report_shows_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, lab = tmp_path / "results", lab_in(tmp_path, monkeypatch)
    lab.__exit__(AssertionError, AssertionError("the test failed"), None)  # never started
    kept = results / "labs" / "test_rekeys_under_ping_ctcp_"
    assert (kept / "c1" / "charon" / "charon.log").read_text().startswith("c1 says hello")
    assert not (kept / "gw" / "charon" / "charon.vici").exists()

    boot = guest.Boot(returncode=1, seconds=1.0, console="", results=results)
    shown = guest.failed_logs(boot, "test_rekeys_under_ping[ctcp]", lines=5)
    assert "c1/charon/charon.log (last 5 lines)" in shown
    assert "gw/tcpencap.log (last 2 lines):\ntcpencap running\nlast line" in shown
    assert shown.count("c1 says hello") == 5


def test_a_lab_that_passed_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results, lab = tmp_path / "results", lab_in(tmp_path, monkeypatch)
    lab.__exit__(None, None, None)
    assert not (results / "labs").exists()
    boot = guest.Boot(returncode=0, seconds=1.0, console="", results=results)
    assert "no logs kept" in guest.failed_logs(boot, "test_rekeys_under_ping[ctcp]")
