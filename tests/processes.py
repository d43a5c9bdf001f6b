"""Real processes for end-to-end and crash tests: start, kill -9, restart, always clean up.

Each process writes its output to a log file in the test's tmp_path, shown when a test fails.
``Processes`` is a context manager: leaving it kills whatever is still running and waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

BIN = Path(sys.executable).parent


def wait_until(
    condition: Callable[[], object],
    *,
    timeout: float = 60.0,
    what: str = "condition",
    interval: float = 0.05,
) -> None:
    """Poll ``condition`` every ``interval`` seconds until it is true; fail after ``timeout``
    seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Process:
    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, list(argv), env, log
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Process:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is running"
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n=== start {self.starts}: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill reaches its children
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if self.running():
            os.killpg(self.pid, signal.SIGKILL)
        self.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.running():
            os.killpg(self.pid, signal.SIGTERM)
            try:
                assert self.popen is not None
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
        return self.wait()

    def wait(self) -> int:
        if self.popen is None:
            return 0
        code = self.popen.wait(60)
        with contextlib.suppress(ProcessLookupError):  # children of an exited group leader
            os.killpg(self.pid, signal.SIGKILL)
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Processes:
    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory, self.env = directory, env
        self.all: list[Process] = []

    def start(self, name: str, argv: Sequence[str], **env: str) -> Process:
        process = Process(name, argv, {**self.env, **env}, self.directory / f"{name}.log")
        self.all.append(process)
        return process.start()

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.output()[-4000:]}" for p in self.all)

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for process in self.all:
            process.terminate(timeout=10)
        if error is not None:
            print(self.logs())  # shown by pytest for the failing test
