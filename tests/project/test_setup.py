"""scripts/setup.sh verifies every strongSwan plugin the lab loads: its list must be the lab's."""

from __future__ import annotations

import re
from pathlib import Path

from tests.labkit import BASE_PLUGINS, OPTIONAL_PLUGINS

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup.sh"


def _array(name: str) -> dict[str, str]:
    m = re.search(rf"^{name}=\((.*?)^\)", SETUP.read_text(), re.S | re.M)
    assert m, f"{name} not found in {SETUP}"
    return dict(entry.split(":", 1) for entry in m.group(1).split())


def test_setup_verifies_exactly_the_plugins_the_lab_loads() -> None:
    assert set(_array("PLUGIN_PACKAGES")) == {*BASE_PLUGINS, *OPTIONAL_PLUGINS}


def test_plugins_the_tests_add_are_declared() -> None:
    from tests.lab import test_e2e_ops, test_e2e_vpnc

    assert set(test_e2e_vpnc.PLUGINS) <= set(OPTIONAL_PLUGINS)
    assert set(test_e2e_ops.CISCO_PLUGINS) <= set(OPTIONAL_PLUGINS)


def test_every_package_verified_is_installed_by_setup() -> None:
    m = re.search(r"^APT_PACKAGES=\((.*?)^\)", SETUP.read_text(), re.S | re.M)
    assert m
    installed = set(m.group(1).split())
    # libstrongswan and strongswan-libcharon come as dependencies of strongswan-charon.
    needed = {*_array("PLUGIN_PACKAGES").values(), *_array("TOOL_PACKAGES").values()}
    assert needed - installed <= {"libstrongswan", "strongswan-libcharon"}
