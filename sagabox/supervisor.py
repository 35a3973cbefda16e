"""Starts sagabox's processes here, each logging to its own file, and stops them all.

The demo, the benchmarks and the end-to-end tests run the real processes through
this, the way a service manager would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
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


@dataclass
class Supervisor:
    log_dir: Path
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    processes: dict[str, tuple[ProcessSpec, subprocess.Popen[bytes]]] = field(default_factory=dict)

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
        return process

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
        _, process = self.processes[name]
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
