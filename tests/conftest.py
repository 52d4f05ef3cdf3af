"""Suite-wide pytest settings: the run order.

The unit tests (seconds) run before the lab tests under tests/lab/ (minutes: namespaces and
real charon), so a broken unit shows up at once instead of after the lab. Within each group
the order stays pytest's own (by path), so a module's tests stay together with their fixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

LAB_TESTS = Path(__file__).resolve().parent / "lab"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Stable partition: every item outside tests/lab/ first, then the lab's."""
    items.sort(key=lambda item: LAB_TESTS in item.path.parents)
