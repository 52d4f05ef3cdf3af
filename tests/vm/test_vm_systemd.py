"""systemd for real: tests/vm/systemd_scenarios.py in each Debian guest (12 with systemd 252,
13 with systemd 257) booted with systemd as PID 1, charon-systemd's strongswan.service and
configs/tcpencap.service installed as the README says. Each step is reported here as its own
test per suite, with what it printed in the guest.

Run with `bash scripts/vm-test.sh` (CI does).
"""

from __future__ import annotations

from typing import Any

import guest
import pytest

pytestmark = pytest.mark.vm

STEPS = [
    "test_1_systemctl_start_and_traffic_over_tcp",
    "test_2_journal_shows_tcpencap",
    "test_3_reload_applies_a_change",
    "test_4_sigkill_is_restarted_and_sas_resume",
    "test_5_systemctl_restart_leaks_no_udp",
    "test_6_unit_runs_confined",
    "test_7_stopping_strongswan_stops_tcpencap_and_leaves_no_rules",
]


@pytest.fixture(scope="module", params=guest.selected_suites())
def guest_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return guest.run_suite(
        request.param, tmp_path_factory, "tests/vm/systemd_scenarios.py", timeout=1500
    )


@pytest.mark.parametrize("name", STEPS)
def test_step(guest_run: dict[str, Any], name: str) -> None:
    guest.report(guest_run["cases"], guest_run["boot"], name)
