"""What can happen to a saga: the machine's inputs. Each event serialises to a dict
(kept in the history) and back, so replaying the history reproduces the state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from outbox_relay.message import Envelope


@dataclass(frozen=True, slots=True)
class Event:
    type: ClassVar[str] = "event"
    message_id: str | None = field(default=None, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        # Shallow: the dict is serialised at once (a history row), and asdict's deep copy
        # of the saga's data was most of a start's cost in building its row.
        out: dict[str, Any] = {"type": self.type}
        names = _FIELD_NAMES.get(type(self))
        if names is None:
            names = _FIELD_NAMES[type(self)] = tuple(f.name for f in fields(self))
        for name in names:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


_FIELD_NAMES: dict[type[Event], tuple[str, ...]] = {}


@dataclass(frozen=True, slots=True)
class Started(Event):
    type: ClassVar[str] = "started"
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StepEvent(Event):
    step: str
    attempt: int
    # Routing slip: the results of the slip's steps that succeeded before this one.
    slip_results: Mapping[str, Any] | None = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class StepSucceeded(StepEvent):
    type: ClassVar[str] = "step_succeeded"
    # Whatever the participant sent; the machine checks it against the definition.
    result: Any = None


@dataclass(frozen=True, slots=True)
class StepFailed(StepEvent):
    """A business failure: the participant refused and applied nothing."""

    type: ClassVar[str] = "step_failed"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class StepCancelled(StepEvent):
    """The participant refused a command whose compensation had already arrived."""

    type: ClassVar[str] = "step_cancelled"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class StepErrored(StepEvent):
    """A technical failure of one attempt (the participant's own retries ran out)."""

    type: ClassVar[str] = "step_errored"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class CompensationSucceeded(StepEvent):
    type: ClassVar[str] = "compensation_succeeded"


@dataclass(frozen=True, slots=True)
class CompensationFailed(StepEvent):
    type: ClassVar[str] = "compensation_failed"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class TimersDue(Event):
    """The clock passed one or more of the saga's deadlines or scheduled retries."""

    type: ClassVar[str] = "timers_due"


@dataclass(frozen=True, slots=True)
class OperatorEvent(Event):
    """A person's decision about a parked or running saga: who took it and why."""

    actor: str = field(default="", kw_only=True)
    reason: str = field(default="", kw_only=True)


@dataclass(frozen=True, slots=True)
class StepRetried(OperatorEvent):
    """Send a new attempt of the parked step (or of its compensation)."""

    type: ClassVar[str] = "step_retried"
    step: str


@dataclass(frozen=True, slots=True)
class StepSkipped(OperatorEvent):
    """Count a step as done by hand: succeeded with ``result``, or compensated."""

    type: ClassVar[str] = "step_skipped"
    step: str
    result: Any = None


@dataclass(frozen=True, slots=True)
class SagaAborted(OperatorEvent):
    """Start backward recovery of a saga whose pivot has not passed."""

    type: ClassVar[str] = "saga_aborted"


@dataclass(frozen=True, slots=True)
class SagaResumed(OperatorEvent):
    """A parked saga goes on where it stopped."""

    type: ClassVar[str] = "saga_resumed"


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        Started,
        StepSucceeded,
        StepFailed,
        StepCancelled,
        StepErrored,
        CompensationSucceeded,
        CompensationFailed,
        TimersDue,
        StepRetried,
        StepSkipped,
        SagaAborted,
        SagaResumed,
    )
}


def event_from_dict(data: Mapping[str, Any]) -> Event:
    cls = EVENT_TYPES[data["type"]]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


_REPLY_EVENTS: dict[str, type[StepEvent]] = {
    "succeeded": StepSucceeded,
    "failed": StepFailed,
    "cancelled": StepCancelled,
    "error": StepErrored,
    "compensated": CompensationSucceeded,
    "compensation_failed": CompensationFailed,
}


def event_from_reply(reply: Envelope) -> StepEvent:
    """The machine event a reply envelope stands for (the envelope was validated)."""
    cls = _REPLY_EVENTS[reply.type]
    common: dict[str, Any] = {
        "step": reply.step,
        "attempt": reply.attempt,
        "message_id": reply.message_id,
    }
    if reply.slip is not None and reply.slip.results:
        common["slip_results"] = {k: dict(v) for k, v in reply.slip.results.items()}
    if cls is StepSucceeded:
        return StepSucceeded(**common, result=reply.payload.get("result", {}))
    if cls is CompensationSucceeded:
        return CompensationSucceeded(**common)
    reason = reply.payload.get("reason")
    return cls(**common, reason=str(reason) if reason is not None else reply.type)  # type: ignore[call-arg]
