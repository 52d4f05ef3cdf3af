"""A pytest plugin: tcpencap.native._fastpath is the sanitizer build named by
TCPENCAP_FASTPATH_SO (scripts/fuzz-native.sh builds it with gcc into build/fuzz-native and
runs tests/native/test_fastpath.py with it, libasan and libubsan preloaded), not the in-place build.

Loaded with ``-p asan_extension`` before anything imports tcpencap.native, so the package's
own ``from tcpencap.native import _fastpath`` finds this module in sys.modules.
"""

from __future__ import annotations

import importlib.util
import os
import sys

NAME = "tcpencap.native._fastpath"
PATH = os.environ["TCPENCAP_FASTPATH_SO"]

_spec = importlib.util.spec_from_file_location(NAME, PATH)
assert _spec is not None and _spec.loader is not None, f"cannot load {PATH}"
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
sys.modules[NAME] = _module

import tcpencap.native  # noqa: E402  (after the module is in place)

assert tcpencap.native._module is _module, "tcpencap.native did not take the sanitizer build"
with open("/proc/self/maps") as _maps:
    assert "libasan" in _maps.read(), "libasan is not loaded: the sanitizer build cannot report"


def pytest_report_header() -> str:
    """Say which build the run tests, so a log cannot be mistaken for the plain one's."""
    return f"native extension: sanitizer build {PATH}"
