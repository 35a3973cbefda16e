"""What a handler is given besides its session and payload, and how handlers are stored."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from sqlalchemy.orm import Session

from outbox_relay.message import Envelope

Action = Literal["command", "compensation"]


@dataclass(frozen=True, slots=True)
class Context:
    """The saga coordinates of the message being handled.

    ``command_result`` is, for a compensation, the result the compensated command
    returned (so a refund knows the charge id); None for commands.
    """

    service: str
    saga_id: str
    saga: str
    version: int
    step: str
    attempt: int
    message_id: str
    action: Action
    name: str
    command_result: Mapping[str, Any] | None = None

    @classmethod
    def of(
        cls,
        service: str,
        envelope: Envelope,
        command_result: Mapping[str, Any] | None = None,
    ) -> Context:
        return cls(
            service=service,
            saga_id=envelope.correlation_id,
            saga=envelope.saga,
            version=envelope.version,
            step=envelope.step,
            attempt=envelope.attempt,
            message_id=envelope.message_id,
            action="compensation" if envelope.kind == "compensation" else "command",
            name=envelope.type,
            command_result=command_result,
        )


Payload: TypeAlias = Mapping[str, Any]
CommandFn: TypeAlias = Callable[[Session, Payload, Context], Mapping[str, Any] | None]
CompensationFn: TypeAlias = Callable[[Session, Payload, Context], None]


@dataclass(frozen=True, slots=True)
class Handler:
    """One command or compensation a participant answers (one dramatiq actor)."""

    name: str
    action: Action
    fn: Callable[[Session, Payload, Context], Any]
    # For a command: the name of the compensation that undoes it, if any.
    compensation: str | None = None


CONTEXT_KEYS = (
    "service",
    "correlation_id",
    "message_id",
    "causation_id",
    "saga",
    "version",
    "step",
    "attempt",
    "type",
)


def log_context(service: str, envelope: Envelope) -> dict[str, Any]:
    """What every log line about ``envelope`` carries."""
    return {
        "service": service,
        "correlation_id": envelope.correlation_id,
        "message_id": envelope.message_id,
        "causation_id": envelope.causation_id,
        "saga": envelope.saga,
        "version": envelope.version,
        "step": envelope.step,
        "attempt": envelope.attempt,
        "type": envelope.type,
    }
