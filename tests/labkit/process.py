"""Programs the lab runs: one-shot commands (``run``) and tracked long-running ones
(``Process``), and the lab's error type."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


class LabError(RuntimeError):
    """A lab step failed; the message carries the relevant log tail."""


def run(
    argv: Sequence[str],
    check: bool = True,
    timeout: float = 30,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion, output captured as text; LabError if ``check`` and it fails."""
    full_env = {**os.environ, **env} if env else None
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


class Process:
    """A process started in a namespace; its stdout and stderr go to ``log``."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: Sequence[str], log: Path) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.argv = list(argv)
        self.log = log

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, substring: str, timeout: float = 5.0) -> None:
        """Wait until the log contains ``substring``; raise LabError if it exits or times out."""
        deadline = time.monotonic() + timeout
        while substring not in self.log_text():
            if not self.alive():
                raise LabError(f"{self.argv} exited ({self.popen.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise LabError(f"{self.argv}: no {substring!r} in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.01)

    def signal(self, sig: int) -> None:
        """Signal the process group (the process was started as its own session leader)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 3.0) -> int | None:
        """TERM, then KILL after ``timeout``; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout)
            # Children that outlived the leader; its id was reaped just now, not yet reused.
            self.signal(signal.SIGKILL)
        return self.popen.returncode
