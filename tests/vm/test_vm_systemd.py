"""systemd for real: tests/vm/systemd_scenarios.py in each Debian guest (12 with systemd 252,
13 with systemd 257) booted with systemd as PID 1: charon-systemd's strongswan.service, and
tcpencap's Debian package (built for the suite by tests/vm/package.py) installed with apt in
the guest, as the README's deployment section says. Each step is reported here as its own
test per suite, with what it printed in the guest.

Run with `bash scripts/vm-test.sh` (CI does).
"""

from __future__ import annotations

from typing import Any

import guest
import package
import pytest

pytestmark = pytest.mark.vm

STEPS = [
    "test_1_apt_install_on_a_running_strongswan",
    "test_2_example_config_reload_and_a_client_over_tcp",
    "test_3_journal_and_man_pages",
    "test_3b_reload_applies_a_change",
    "test_4_sigkill_is_restarted_and_sas_resume",
    "test_5_systemctl_restart_leaks_no_udp",
    "test_6_unit_runs_confined",
    "test_7_stopping_strongswan_stops_tcpencap_and_leaves_no_rules",
    "test_8_apt_remove_stops_it_and_leaves_no_rule_then_purge",
]


@pytest.fixture(scope="module", params=guest.selected_suites())
def guest_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return guest.run_suite(
        request.param,
        tmp_path_factory,
        "tests/vm/systemd_scenarios.py",
        timeout=1500,
        installer=package.package_installer,
    )


@pytest.mark.parametrize("name", STEPS)
def test_step(guest_run: dict[str, Any], name: str) -> None:
    guest.report(guest_run["cases"], guest_run["boot"], name)
