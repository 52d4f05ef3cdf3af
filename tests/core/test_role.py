"""tcpencap.core.role: one role type that compares and prints as the configuration's text."""

from __future__ import annotations

import json

import pytest

from tcpencap.core.role import Role


def test_roles_are_the_configuration_words() -> None:
    """Status JSON and the configuration say "client" / "gateway": the enum must equal them."""
    assert Role.CLIENT == "client" and Role.GATEWAY == "gateway"
    assert f"{Role.GATEWAY}" == "gateway" and str(Role.CLIENT) == "client"
    assert json.dumps({"side": Role.CLIENT}) == '{"side": "client"}'


def test_a_role_is_read_back_from_its_text() -> None:
    assert Role("gateway") is Role.GATEWAY and Role("client") is Role.CLIENT
    assert {r.value for r in Role} == {"client", "gateway"}


def test_an_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError):
        Role("server")
