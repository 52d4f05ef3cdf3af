"""A newcomer finds a module's tests by its name: every module of tcpencap/, nfq/ and
vici_bridge/ has ``tests/<layer>/test_<module>.py`` (or ``test_<module>_<aspect>.py``),
where <layer> is the module's folder (tcpencap/core -> core, nfq -> nfq; a top-level
tcpencap/x.py -> tests/test_x.py), and no test file sits outside the folder of its layer."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
PACKAGES = ("tcpencap", "nfq", "vici_bridge")
NO_TESTS_NEEDED = {"__init__.py", "__main__.py"}

# Modules whose test files are on their way; each entry leaves once its file is merged.
WAITING: set[str] = set()

# Folders of tests that belong to no one module (tests/ itself holds those of tcpencap/*.py).
OTHER_FOLDERS = {"lab", "labkit", "vm", "fuzz", "project"}


def modules() -> list[Path]:
    return sorted(
        p.relative_to(ROOT)
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if p.name not in NO_TESTS_NEEDED
    )


def folder_for_tests(module: Path) -> Path:
    """tests/<layer>/ for a module in a sub-package, tests/ for tcpencap/x.py."""
    return TESTS if module.parent == Path("tcpencap") else TESTS / module.parent.name


def has_tests(module: Path) -> bool:
    folder = folder_for_tests(module)
    return (folder / f"test_{module.stem}.py").is_file() or any(
        folder.glob(f"test_{module.stem}_*.py")
    )


def test_every_module_has_a_test_file_named_after_it() -> None:
    missing = [
        f"{m} -> {folder_for_tests(m).relative_to(ROOT)}/test_{m.stem}.py"
        for m in modules()
        if str(m) not in WAITING and not has_tests(m)
    ]
    assert not missing, "modules without a test file of their name:\n  " + "\n  ".join(missing)


def test_the_waiting_list_holds_only_modules_still_waiting() -> None:
    names = {str(m) for m in modules()}
    gone = sorted(w for w in WAITING if w not in names)
    assert not gone, f"no such modules any more, take them off WAITING: {gone}"
    done = sorted(w for w in WAITING if has_tests(Path(w)))
    assert not done, f"these have their test files now, take them off WAITING: {done}"


def top_level_test(path: Path) -> bool:
    """tests/test_<m>.py or tests/test_<m>_<aspect>.py for a module tcpencap/<m>.py."""
    tops = {m.stem for m in modules() if m.parent == Path("tcpencap")}
    return path.parent == TESTS and any(
        path.name == f"test_{m}.py" or path.name.startswith(f"test_{m}_") for m in tops
    )


def test_no_test_file_sits_outside_its_layer() -> None:
    layers = {m.parent.name for m in modules() if m.parent != Path("tcpencap")}
    allowed = {TESTS / name for name in layers | OTHER_FOLDERS}
    stray = [
        str(p.relative_to(ROOT))
        for p in sorted(TESTS.rglob("test_*.py"))
        if not top_level_test(p) and not any(folder in p.parents for folder in allowed)
    ]
    assert not stray, (
        "test files outside tests/<layer>/ (or lab, labkit, vm, fuzz, project):\n  "
        + "\n  ".join(stray)
    )


def test_the_layout_check_sees_the_packages() -> None:
    """The checks above pass vacuously if the walk finds nothing: it must find modules of
    every package and of every layer."""
    found = {str(m) for m in modules()}
    samples = ("tcpencap/core/router.py", "nfq/queue.py", "vici_bridge/bridge.py",
               "tcpencap/config.py", "tcpencap/aio/daemon.py", "tcpencap/wire/ike.py")  # fmt: skip
    assert found >= set(samples)
    assert folder_for_tests(Path("tcpencap/config.py")) == TESTS
    assert folder_for_tests(Path("tcpencap/native/datapath.py")) == TESTS / "native"
    assert top_level_test(TESTS / "test_config_tls.py") and not top_level_test(TESTS / "test_x.py")
    assert not top_level_test(TESTS / "core" / "test_config.py")
