"""tcpencap against libreswan, the RFC 8229/9329 implementation people deploy:
tests/vm/libreswan_scenarios.py in the trixie guest booted on the lab's espintcp kernel
(tests/vm/espintcp_kernel.py builds it from Debian's linux-source, cached), with libreswan in
its own root file system (tests/vm/libreswan_image.py). Each scenario is reported here as its
own test, with what it printed in the guest.

Run with `bash scripts/vm-test.sh` (CI does). The first run builds the kernel (see the README).
"""

from __future__ import annotations

from typing import Any

import guest
import libreswan_image
import pytest

pytestmark = pytest.mark.vm

if libreswan_image.SUITE not in guest.selected_suites():
    pytest.skip(
        f"the libreswan scenarios boot {libreswan_image.SUITE}'s guest on its espintcp kernel; "
        f"this run selected {guest.selected_suites()}",
        allow_module_level=True,
    )

SCENARIOS = [
    "test_espintcp_kernel",
    "test_libreswan_client_to_tcpencap_gateway[4-4500]",
    "test_libreswan_client_to_tcpencap_gateway[6-4500]",
    "test_libreswan_client_to_tcpencap_gateway[4-443]",
    "test_tcpencap_client_to_libreswan_gateway",
    "test_libreswan_fallback_ends_on_tcp",
]


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return guest.run_suite(
        libreswan_image.SUITE, tmp_path_factory, "tests/vm/libreswan_scenarios.py",
        timeout=1800, installer=libreswan_image.libreswan_installer,
    )  # fmt: skip


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(guest_run: dict[str, Any], name: str) -> None:
    guest.report(guest_run["cases"], guest_run["boot"], name)
