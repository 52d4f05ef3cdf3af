"""The stock-kernel lab: tests/vm/kernel_scenarios.py run inside each Debian guest (12 and
13, ``guest.SUITES``: the stock kernel, ESP in XFRM through kernel-netlink), one boot per suite
for all of them. Each scenario is reported here as its own test per suite (``[bookworm-...]``,
``[trixie-...]``), with what it printed in the guest.

Run with `bash scripts/vm-test.sh` (CI does). Needs root, qemu-system-x86_64 and debootstrap;
the first run builds the cached guest root file system (a few minutes).
"""

from __future__ import annotations

from typing import Any

import guest
import pytest

pytestmark = pytest.mark.vm

# Every scenario the guest must run; one missing from its report fails below.
SCENARIOS = [
    "test_ikev2_psk[rfc9329-4]",
    "test_ikev2_psk[rfc9329-6]",
    "test_ikev2_psk[ctcp-4]",
    "test_ikev2_psk[ctcp-6]",
    "test_ikev1_main_mode_over_ctcp",
    "test_rekeys_under_ping[rfc9329]",
    "test_rekeys_under_ping[ctcp]",
    "test_mobike_address_change[rfc9329]",
    "test_mobike_address_change[ctcp]",
    "test_tcpencap_restart[rfc9329]",
    "test_tcpencap_restart[ctcp]",
    "test_ike_rekey_then_mobike[rfc9329]",
    "test_ike_rekey_then_mobike[ctcp]",
]


@pytest.fixture(scope="module", params=guest.selected_suites())
def guest_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return guest.run_suite(
        request.param, tmp_path_factory, "tests/vm/kernel_scenarios.py", timeout=3000
    )


def test_guest_ran_every_scenario(guest_run: dict[str, Any]) -> None:
    boot = guest_run["boot"]
    assert set(guest_run["cases"]) == set(SCENARIOS), (
        f"guest ran {sorted(guest_run['cases'])}; exit {boot.returncode}\n"
        f"--- run.log tail:\n{boot.run_log()[-3000:]}\n--- console tail:\n{boot.console[-3000:]}"
    )


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(guest_run: dict[str, Any], name: str) -> None:
    guest.report(guest_run["cases"], guest_run["boot"], name)
