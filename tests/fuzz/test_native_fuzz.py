"""The native data path fuzzed under AddressSanitizer and UBSan (scripts/fuzz-native.sh).

One run of every libFuzzer target for FUZZ_NATIVE_SECONDS each (default 20: about two and
a half minutes with the builds and the sanitizer build's test_fastpath run), which must
report nothing; and proof that the run cannot pass vacuously: a copy of the extension with
a bug planted in it (a read past a packet, an undefined shift, a leak, a wrong length field)
is reported by the target that covers that code, within a bounded time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuzz

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "fuzz-native.sh"
TARGETS = sorted(
    p.stem.removeprefix("fuzz_") for p in (REPO / "tests/fuzz/native").glob("fuzz_*.c")
)


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """scripts/fuzz-native.sh with this interpreter (its venv has pytest and the headers)."""
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_target_runs_and_reports_nothing(tmp_path: Path) -> None:
    assert set(TARGETS) == {"deframer", "flows", "inject", "nfq", "writer"}
    seconds = int(os.environ.get("FUZZ_NATIVE_SECONDS", "20"))
    res = run_script(
        "--seconds", str(seconds), "--out", str(tmp_path), timeout=60 + 3 * seconds * len(TARGETS)
    )
    out = res.stdout + res.stderr
    print(res.stdout)  # the figures, in the CI log
    assert res.returncode == 0, out
    for name in TARGETS:
        m = re.search(
            rf"^fuzz-native: {name}: (\d+) runs in \d+ s, cov: (\d+) ft: (\d+): no reports$",
            res.stdout,
            re.M,
        )
        assert m, f"no clean summary for {name}:\n{out}"
        runs, cov = int(m[1]), int(m[2])
        assert runs >= 100 * seconds, f"{name}: only {runs} runs in {seconds} s"
        assert cov >= 50, f"{name}: coverage {cov}: the target hardly reaches the code"
    m = re.search(
        r"^fuzz-native: extension: gcc build, tests/native/test_fastpath.py, test_fastpath_api.py: "
        r"(\d+) passed",
        res.stdout,
        re.M,
    )
    assert m and int(m[1]) >= 20, out


# (target, file, the original text, the planted bug, what the report must say)
PLANTED = {
    "read-past-packet": (
        "flows",
        "flow_cache.c",
        "if (len >= 36 && p[0] == 0x45",
        "if (len >= 28 && p[0] == 0x45",
        "ERROR: AddressSanitizer: heap-buffer-overflow",
    ),
    "signed-shift": (
        "nfq",
        "flow_cache.c",
        "k->spi = ((uint32_t)p[28] << 24)",
        "k->spi = (p[28] << 24)",
        "runtime error: left shift",
    ),
    "leak": (
        "inject",
        "inject.c",
        "    PyMem_RawFree(b->buf);\n    PyMem_RawFree(b->pk);",
        "    PyMem_RawFree(b->pk);",
        "ERROR: LeakSanitizer: detected memory leaks",
    ),
    "udp-length": (
        "inject",
        "inject.c",
        "put16(h + 24, n - 20);",
        "put16(h + 24, n - 21);",
        "fuzz invariant broken",
    ),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_a_planted_bug_is_reported(bug: str, tmp_path: Path) -> None:
    target, name, good, bad, report = PLANTED[bug]
    src = tmp_path / "src"
    shutil.copytree(
        REPO / "tcpencap" / "native",
        src / "tcpencap" / "native",
        ignore=shutil.ignore_patterns("*.so"),
    )
    path = src / "tcpencap" / "native" / "src" / name
    text = path.read_text()
    assert text.count(good) == 1, f"{name} changed: plant {bug} anew"
    path.write_text(text.replace(good, bad))
    res = run_script(
        "--seconds", "60", "--src", str(src), "--out", str(tmp_path / "out"), target, timeout=180
    )
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert f"fuzz-native: {target}: REPORT" in res.stderr, out
    assert report in res.stderr, out
    assert list((tmp_path / "out" / "artifacts").glob(f"{target}-*")), "the input was not kept"
