"""What one system measured in a run, in a shape every system shares (and JSON for peers)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sagabox.benchmarks.drive import Run


@dataclass
class Measured:
    """The measured closed loop: commits, CPU seconds per process group, broker messages."""

    run: Run
    commits: int
    cpu_seconds: dict[str, float]
    messages: int = 0
    commit_split: dict[str, int] = field(default_factory=dict)  # database -> commits

    def per_saga(self, value: float) -> float:
        return value / self.run.count if self.run.count else float("nan")


@dataclass(frozen=True)
class Retention:
    """What the orchestrator's retention job did after a growth run."""

    purged: int
    seconds: float
    rows_left: dict[str, int]  # table -> rows


@dataclass
class SystemResult:
    name: str
    config: str
    main: Measured
    sweep: dict[int, Run] = field(default_factory=dict)
    open: Run | None = None
    problems: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # table -> bytes after the run
    replicas: int = 1  # processes of each component (sagabox only; a peer is 1)
    retention: Retention | None = None  # growth runs only

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "main": {
                "run": _run(self.main.run),
                "commits": self.main.commits,
                "cpu_seconds": self.main.cpu_seconds,
                "messages": self.main.messages,
                "commit_split": self.main.commit_split,
            },
            "sweep": {str(c): _run(r) for c, r in self.sweep.items()},
            "open": _run(self.open) if self.open else None,
            "problems": self.problems,
            "sizes": self.sizes,
            "replicas": self.replicas,
            "retention": dataclasses.asdict(self.retention) if self.retention else None,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SystemResult:
        main = raw["main"]
        return cls(
            raw["name"],
            raw["config"],
            Measured(
                _unrun(main["run"]),
                main["commits"],
                main["cpu_seconds"],
                main["messages"],
                dict(main.get("commit_split", {})),
            ),
            {int(c): _unrun(r) for c, r in raw["sweep"].items()},
            _unrun(raw["open"]) if raw["open"] else None,
            list(raw["problems"]),
            dict(raw.get("sizes", {})),
            int(raw.get("replicas", 1)),
            Retention(**raw["retention"]) if raw.get("retention") else None,
        )


def _run(run: Run) -> dict[str, Any]:
    return {"count": run.count, "seconds": run.seconds, "latencies_ms": run.latencies_ms}


def _unrun(raw: dict[str, Any]) -> Run:
    return Run(raw["count"], raw["seconds"], list(raw["latencies_ms"]))


def unexpected(run: Run, expected: Any) -> list[str]:
    """Sagas whose status is not what their order calls for (declined -> compensated)."""
    wrong = [
        f"saga {saga_id} (order {run.expected[saga_id]}) ended {status}"
        for saga_id, status in run.statuses.items()
        if status != expected(run.expected[saga_id])
    ]
    return wrong[:5] + ([f"... {len(wrong) - 5} more"] if len(wrong) > 5 else [])
