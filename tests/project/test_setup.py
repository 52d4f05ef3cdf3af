"""scripts/setup.sh verifies every strongSwan plugin the lab loads: its lists (one per Debian
suite, since trixie moved plugins between packages) must be the lab's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.labkit import BASE_PLUGINS, OPTIONAL_PLUGINS

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup.sh"
SUITES = ("bookworm", "trixie")


def _words(name: str) -> list[str]:
    m = re.search(rf"^{name}=\((.*?)\)", SETUP.read_text(), re.S | re.M)
    assert m, f"{name} not found in {SETUP}"
    return m.group(1).split()


def _array(name: str) -> dict[str, str]:
    return dict(entry.split(":", 1) for entry in _words(name))


def test_setup_knows_exactly_the_supported_suites() -> None:
    m = re.search(r'^case "\$SUITE" in\n\s*([\w|]+)\)', SETUP.read_text(), re.M)
    assert m and tuple(m.group(1).split("|")) == SUITES


@pytest.mark.parametrize("suite", SUITES)
def test_setup_verifies_exactly_the_plugins_the_lab_loads(suite: str) -> None:
    assert set(_array(f"PLUGIN_PACKAGES_{suite}")) == {*BASE_PLUGINS, *OPTIONAL_PLUGINS}


def test_plugins_the_tests_add_are_declared() -> None:
    from tests.lab import test_e2e_ops, test_e2e_vpnc

    assert set(test_e2e_vpnc.PLUGINS) <= set(OPTIONAL_PLUGINS)
    assert set(test_e2e_ops.CISCO_PLUGINS) <= set(OPTIONAL_PLUGINS)


@pytest.mark.parametrize("suite", SUITES)
def test_every_package_verified_is_installed_by_setup(suite: str) -> None:
    installed = {*_words("APT_PACKAGES"), *_words(f"APT_PACKAGES_{suite}")}
    # libstrongswan and strongswan-libcharon come as dependencies of strongswan-charon.
    needed = {*_array(f"PLUGIN_PACKAGES_{suite}").values(), *_array("TOOL_PACKAGES").values()}
    assert needed - installed <= {"libstrongswan", "strongswan-libcharon"}
