"""Run the fuzz targets of tests/fuzz/fuzz_targets.py for a fixed time each.

    python3 -m bench.fuzz [--seconds 180] [--targets rfc9329,ctcp,...] [--workdir DIR]

Engine: atheris (coverage-guided libFuzzer, ``pip install atheris``); each target runs in a
child process with tcpencap and vici_bridge instrumented, a corpus per target under
``--workdir`` (kept between runs) and crash inputs written there as ``crash-*``. After a
crash the target is restarted for the rest of its time, so one run reports several
findings. Without atheris the hypothesis tests run instead, with FUZZ_EXAMPLES examples
per target. Prints, per target: seconds, executions, executions per second, crashes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FUZZ_DIR = REPO / "tests" / "fuzz"


def child(name: str, seconds: int, corpus: Path, artifacts: Path) -> None:
    """Inside the child process: instrument, then hand the target to libFuzzer."""
    import atheris

    targets = "tests.fuzz.fuzz_targets"
    with atheris.instrument_imports(include=["tcpencap", "vici_bridge", targets]):
        from tests.fuzz import fuzz_targets
    target = fuzz_targets.TARGETS[name]
    args = [
        sys.argv[0],
        f"-max_total_time={seconds}",
        f"-artifact_prefix={artifacts}/",
        "-rss_limit_mb=4096",
        "-timeout=20",
        "-print_final_stats=1",
        str(corpus),
    ]
    atheris.Setup(args, target)
    atheris.Fuzz()


def run_target(name: str, seconds: int, workdir: Path) -> dict[str, object]:
    corpus = workdir / "corpus" / name
    artifacts = workdir / "artifacts" / name
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    execs, crashes, t0 = 0, [], time.monotonic()
    while (left := int(seconds - (time.monotonic() - t0))) > 2:
        before = set(artifacts.iterdir())
        proc = subprocess.run(
            [sys.executable, "-m", "bench.fuzz", "--child", name, "--seconds", str(left)]
            + ["--workdir", str(workdir)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        log = proc.stderr
        (workdir / f"{name}.log").open("a").write(log)
        m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
        m = m or re.findall(r"Done (\d+) runs", log)
        if not m:  # a crash ends without final stats: take the last progress line
            m = re.findall(r"#(\d+)\s", log)
        execs += int(m[-1]) if m else 0
        new = sorted(set(artifacts.iterdir()) - before)
        if proc.returncode != 0 or new:
            tb = log[log.find("=== Uncaught Python exception") :][:2000] if new else log[-2000:]
            crashes.append({"files": [str(p) for p in new], "traceback": tb})
            if not new:
                break  # the child failed without an input to blame: do not loop
            if len(crashes) >= 5:
                break
    elapsed = time.monotonic() - t0
    return {"target": name, "seconds": round(elapsed), "execs": execs, "crashes": crashes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=180, help="per target (default 180)")
    ap.add_argument("--targets", default="", help="comma separated names (default: all)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tcpencap-fuzz"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.seconds, a.workdir / "corpus" / a.child, a.workdir / "artifacts" / a.child)
        return 0
    from tests.fuzz.fuzz_targets import TARGETS

    names = [n for n in a.targets.split(",") if n] or list(TARGETS)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris not installed: running the hypothesis tests (FUZZ_EXAMPLES) instead")
        env = {**os.environ, "FUZZ_EXAMPLES": os.environ.get("FUZZ_EXAMPLES", "100000")}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(FUZZ_DIR)]
        return subprocess.run(cmd, env=env, cwd=REPO, check=False).returncode
    a.workdir.mkdir(parents=True, exist_ok=True)
    failed = False
    for name in names:
        r = run_target(name, a.seconds, a.workdir)
        rate = r["execs"] / max(r["seconds"], 1)  # type: ignore[operator]
        crashes = r["crashes"]
        print(
            f"{name:8} {r['seconds']:5d} s  {r['execs']:10d} execs  {rate:9.0f}/s  "
            f"crashes: {len(crashes)}",  # type: ignore[arg-type]
            flush=True,
        )
        for c in crashes:  # type: ignore[attr-defined]
            failed = True
            print(f"  crash input: {', '.join(c['files']) or '(none)'}\n{c['traceback']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
