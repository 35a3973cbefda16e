"""Starts sagabox's processes here, each logging to its own file, and stops them all.

The demo, the benchmarks, ``sagabox up`` and the end-to-end tests run the real
processes through this, the way a service manager would. With a ``RestartPolicy``,
``tick()`` starts again a process that died (not one being stopped), after a delay
that doubles per consecutive failure and resets once a process stayed up a while.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One process to run: a name (also its log file's), its argv and extra environment."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)


def sagabox_argv(*args: str) -> list[str]:
    """argv running the ``sagabox`` CLI with this interpreter (no PATH lookup needed)."""
    return [sys.executable, "-m", "sagabox", *args]


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When to start a dead process again: ``initial`` seconds after its first failure,
    doubling per consecutive failure up to ``maximum``; a process that ran at least
    ``reset_after`` seconds before dying starts over at ``initial``."""

    initial: float = 0.5
    maximum: float = 30.0
    reset_after: float = 30.0

    def delay(self, failures: int) -> float:
        """The wait before the restart that follows ``failures`` consecutive failures."""
        return float(min(self.maximum, self.initial * 2 ** max(0, failures - 1)))


@dataclass(frozen=True, slots=True)
class Restart:
    """A process the supervisor started again: its name, exit code and new pid."""

    name: str
    exit_code: int
    pid: int
    failures: int


@dataclass
class Supervisor:
    log_dir: Path
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    processes: dict[str, tuple[ProcessSpec, subprocess.Popen[bytes]]] = field(default_factory=dict)
    restart_policy: RestartPolicy | None = None
    clock: Callable[[], float] = time.monotonic
    restarts: dict[str, int] = field(default_factory=dict)
    _started_at: dict[str, float] = field(default_factory=dict)
    _failures: dict[str, int] = field(default_factory=dict)
    _due: dict[str, float] = field(default_factory=dict)
    _stopped: set[str] = field(default_factory=set)
    _stopping: bool = False

    def start(self, spec: ProcessSpec) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_file(spec.name)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                list(spec.argv),
                env={**self.base_env, **spec.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes[spec.name] = (spec, process)
        self._started_at[spec.name] = self.clock()
        self._due.pop(spec.name, None)
        self._stopped.discard(spec.name)
        return process

    def tick(self) -> list[Restart]:
        """Restart the dead processes whose backoff has passed (needs a restart policy)."""
        policy = self.restart_policy
        if policy is None or self._stopping:
            return []
        now = self.clock()
        restarted: list[Restart] = []
        for name, code in self.dead().items():
            if name in self._stopped:
                continue
            due = self._due.get(name)
            if due is None:
                ran = now - self._started_at.get(name, now)
                failures = 1 if ran >= policy.reset_after else self._failures.get(name, 0) + 1
                self._failures[name] = failures
                self._due[name] = now + policy.delay(failures)
                continue
            if now >= due:
                process = self.start(self.processes[name][0])
                self.restarts[name] = self.restarts.get(name, 0) + 1
                restarted.append(Restart(name, code, process.pid, self._failures[name]))
        return restarted

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def pid(self, name: str) -> int:
        return self.processes[name][1].pid

    def dead(self) -> dict[str, int]:
        """Processes that exited, with their exit codes."""
        return {
            name: code
            for name, (_, process) in self.processes.items()
            if (code := process.poll()) is not None
        }

    def signal(self, name: str, signum: int) -> None:
        self.processes[name][1].send_signal(signum)

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        spec, process = self.processes[name]
        if process.poll() is None:
            process.kill()
            process.wait()
        return self.start(spec)

    def stop(self, name: str, timeout: float = 15.0) -> int | None:
        """SIGTERM one process, SIGKILL it after ``timeout``; it is not restarted."""
        _, process = self.processes[name]
        self._stopped.add(name)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def stop_all(self, timeout: float = 15.0) -> dict[str, int | None]:
        """SIGTERM everything, wait up to ``timeout`` in all, then SIGKILL the rest."""
        self._stopping = True
        for _, process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for name, (_, process) in self.processes.items():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            codes[name] = process.returncode
        return codes

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
