"""The saga's state as the pure machine sees it: immutable, JSON round-trippable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any


class SagaStatus(StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    # Parked: needs an operator (a compensation gave up, or a step after the pivot).
    FAILED = "failed"


TERMINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED})
SETTLED = TERMINAL | {SagaStatus.FAILED}


class StepStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"  # command sent for `attempt`; its reply is due by `due`
    RETRYING = "retrying"  # an attempt failed technically; the next one goes at `due`
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"  # business failure: the participant applied nothing
    ABANDONED = "abandoned"  # gave up waiting: the effect is unknown, so it is compensated
    COMPENSATING = "compensating"  # compensation sent for `comp_attempt`, due by `due`
    COMPENSATION_RETRYING = "compensation_retrying"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"  # gave up: the saga is parked


COMPENSATION_IN_PROGRESS = frozenset({StepStatus.COMPENSATING, StepStatus.COMPENSATION_RETRYING})
FORWARD_IN_PROGRESS = frozenset({StepStatus.ACTIVE, StepStatus.RETRYING})
COMPENSATION_DONE_OR_FAILED = frozenset({StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED})

# Steps whose command may have taken effect and so must be compensated.
NEEDS_COMPENSATION = frozenset({StepStatus.SUCCEEDED, StepStatus.ABANDONED})


@dataclass(frozen=True, slots=True)
class StepState:
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    comp_attempt: int = 0
    due: float | None = None
    result: Mapping[str, Any] | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status.value}
        if self.attempt:
            out["attempt"] = self.attempt
        if self.comp_attempt:
            out["comp_attempt"] = self.comp_attempt
        if self.due is not None:
            out["due"] = self.due
        if self.result is not None:
            out["result"] = dict(self.result)
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepState:
        return cls(
            status=StepStatus(data["status"]),
            attempt=data.get("attempt", 0),
            comp_attempt=data.get("comp_attempt", 0),
            due=data.get("due"),
            result=data.get("result"),
            reason=data.get("reason"),
        )


@dataclass(frozen=True, slots=True)
class Timer:
    """A pending deadline or scheduled retry of one step (times are epoch seconds)."""

    step: str
    status: StepStatus
    attempt: int
    due: float


@dataclass(frozen=True, slots=True)
class SagaState:
    saga_id: str
    name: str
    version: int
    status: SagaStatus
    data: Mapping[str, Any]
    steps: Mapping[str, StepState]
    reason: str | None = None
    parked_step: str | None = None
    # The status a parked saga had when it stopped (running or compensating): an
    # operator's retry, skip or resume takes it back there.
    parked_from: SagaStatus | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def step(self, name: str) -> StepState:
        return self.steps[name]

    def with_step(self, name: str, **changes: Any) -> SagaState:
        steps = dict(self.steps)
        steps[name] = replace(steps[name], **changes)
        return replace(self, steps=steps)

    @property
    def timers(self) -> tuple[Timer, ...]:
        return tuple(
            Timer(
                name,
                s.status,
                s.comp_attempt if s.status in COMPENSATION_IN_PROGRESS else s.attempt,
                s.due,
            )
            for name, s in self.steps.items()
            if s.due is not None
        )

    @property
    def wake_at(self) -> float | None:
        dues = [s.due for s in self.steps.values() if s.due is not None]
        return min(dues) if dues else None

    @property
    def results(self) -> dict[str, Mapping[str, Any]]:
        return {n: s.result for n, s in self.steps.items() if s.result is not None}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "saga_id": self.saga_id,
            "name": self.name,
            "version": self.version,
            "status": self.status.value,
            "data": dict(self.data),
            "steps": {name: s.to_dict() for name, s in self.steps.items()},
        }
        if self.reason is not None:
            out["reason"] = self.reason
        if self.parked_step is not None:
            out["parked_step"] = self.parked_step
        if self.parked_from is not None:
            out["parked_from"] = self.parked_from.value
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SagaState:
        return cls(
            saga_id=data["saga_id"],
            name=data["name"],
            version=data["version"],
            status=SagaStatus(data["status"]),
            data=data["data"],
            steps={name: StepState.from_dict(s) for name, s in data["steps"].items()},
            reason=data.get("reason"),
            parked_step=data.get("parked_step"),
            parked_from=_parked_from(data),
            extra=data.get("extra", {}),
        )


def _parked_from(data: Mapping[str, Any]) -> SagaStatus | None:
    if "parked_from" in data:
        return SagaStatus(data["parked_from"])
    if data["status"] != SagaStatus.FAILED.value:
        return None
    # Sagas parked before parked_from was recorded: a step that reached its
    # compensation tells that the saga was compensating.
    backward = {s.value for s in (*COMPENSATION_IN_PROGRESS, *COMPENSATION_DONE_OR_FAILED)}
    if any(step["status"] in backward for step in data["steps"].values()):
        return SagaStatus.COMPENSATING
    return SagaStatus.RUNNING
