"""``pip install .`` as the README's deployment section says: into a clean venv (no system site
packages), without extras. The daemon's command must run there, and every module of the
installed packages must import with only the runtime requirements present: no test-side
package (the lab's scapy, cryptography and pyroute2, or pytest) may be needed, and the runtime
requirements must be exactly the third-party packages the installed code imports.

The checkout's files are copied first (what git tracks plus untracked files it does not
ignore, as tests/vm/guest.py does), so no egg-info or build directory of this checkout leaks
into the build. pip works offline-ish here through PIP_FIND_LINKS and PIP_CERT from the
environment. Needs git, python3-venv and what netfilterqueue builds with: fails, never skips,
without them. Not a lab test: about 8 s here with pip's cache, 18 s without (a fresh machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("tcpencap", "nfq", "vici_bridge")
# The test side's packages: none may be importable in the deployed venv.
TEST_ONLY = ("scapy", "cryptography", "pyroute2", "pytest", "hypothesis", "tests")

# Run inside the new venv (python -I: no PYTHONPATH, no working directory on sys.path).
CHECK = r"""
import ast, importlib, importlib.metadata as md, importlib.util, json, pkgutil, sys
from pathlib import Path

packages, test_only = json.loads(sys.argv[1]), json.loads(sys.argv[2])
present = [n for n in test_only if importlib.util.find_spec(n) is not None]

def fail(name):
    raise  # walk_packages swallows a subpackage's ImportError unless told otherwise

modules = {}
for name in packages:
    pkg = importlib.import_module(name)
    modules[name] = pkg.__file__
    for info in pkgutil.walk_packages(pkg.__path__, name + ".", onerror=fail):
        if info.name.endswith(".__main__"):  # runs the program: the caller runs it with -m
            modules[info.name] = importlib.util.find_spec(info.name).origin
            continue
        modules[info.name] = importlib.import_module(info.name).__file__

# Top-level names of every import statement in the installed code, also inside functions.
imported = set()
for path in modules.values():
    if not path.endswith(".py"):  # the compiled data path imports nothing
        continue
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
third_party = sorted(imported - set(sys.stdlib_module_names) - set(packages))
dists = md.packages_distributions()
print(json.dumps({
    "present": present,
    "modules": modules,
    "third_party": {name: dists.get(name) for name in third_party},
    "requires": md.requires("tcpencap") or [],
    "loaded": sorted({name.split(".")[0] for name in sys.modules} & set(test_only)),
}))
"""


def _copy_checkout(dst: Path) -> None:
    assert shutil.which("git"), "git is needed (scripts/setup.sh installs it)"
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        rel = Path(os.fsdecode(name))
        if (REPO / rel).is_file():  # a tracked file deleted in the work tree is skipped
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)


def _run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    res = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert res.returncode == 0, (
        f"{' '.join(argv)} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res


def _name(requirement: str) -> str:
    m = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert m, requirement
    return re.sub(r"[-_.]+", "-", m.group(0)).lower()


def test_pip_install_without_extras(tmp_path: Path) -> None:
    src, venv, work = tmp_path / "src", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    _copy_checkout(src)
    assert not list(src.glob("*.egg-info")) and not (src / "build").exists()

    _run([sys.executable, "-m", "venv", str(venv)], work, 120)
    cfg = (venv / "pyvenv.cfg").read_text()
    assert re.search(r"^include-system-site-packages = false$", cfg, re.M), cfg
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "--no-input", str(src)], work, 900)

    assert "check-config" in _run([str(venv / "bin" / "tcpencap"), "--help"], work, 60).stdout
    assert "check-config" in _run([py, "-I", "-m", "tcpencap", "--help"], work, 60).stdout
    assert (venv / "share" / "doc" / "tcpencap" / "README.md").is_file()

    res = _run([py, "-I", "-c", CHECK, json.dumps(PACKAGES), json.dumps(TEST_ONLY)], work, 120)
    got = json.loads(res.stdout)
    assert got["present"] == [], f"test-side packages in the deployed venv: {got['present']}"
    assert got["loaded"] == []
    modules = got["modules"]
    assert {
        "tcpencap.cli",
        "tcpencap.__main__",
        "tcpencap.aio.daemon",
        "tcpencap.native._fastpath",  # pip install . built the native data path
        "nfq",
        "vici_bridge",
    } <= set(modules)
    assert not {"tcpencap.lab", "tcpencap.demo"} & set(modules), "the lab is test-side"
    site = str(venv.resolve())
    strays = {m: f for m, f in modules.items() if not str(Path(f).resolve()).startswith(site)}
    assert not strays, f"imported from outside the venv: {strays}"

    # install_requires is exactly what the installed code imports.
    runtime = {_name(r) for r in got["requires"] if "extra ==" not in r}
    missing = {m: d for m, d in got["third_party"].items() if not d}
    assert not missing, f"imported but installed by no distribution: {missing}"
    imported = {_name(d) for dists in got["third_party"].values() for d in dists}
    assert imported == runtime, f"imported {sorted(imported)}, required {sorted(runtime)}"
