"""The OpenTelemetry span of one step attempt: from its command sent to its reply applied.

The engine's ``saga reply`` span covers applying a reply; this one covers the whole
round trip (outbox, relay, broker, participant, reply), so a trace shows where a
step's time went. It is recorded once the reply is applied, with the time the command
was sent as its start, which the saga state already holds: the machine sets an
attempt's ``due`` to the time it sent the attempt plus the step's timeout, and a
definition's timeouts never change within its version. No time is stored for it, and
nothing is read.

A reply to an earlier attempt than the one in flight (a late success), or to an
attempt of a parked saga (parking clears the deadlines), gets no such span: its send
time is no longer known.
"""

from __future__ import annotations

from orchestrator.definition import Saga
from orchestrator.state import SagaState, StepStatus
from outbox_relay import tracing
from outbox_relay.message import Envelope

COMMAND_REPLIES = frozenset({"succeeded", "failed", "cancelled", "error"})
COMPENSATION_REPLIES = frozenset({"compensated", "compensation_failed"})


def attempt_sent(definition: Saga, before: SagaState, reply: Envelope) -> tuple[str, float] | None:
    """The action (``do`` / ``compensate``) and send time of the attempt ``reply`` answers.

    On a routing slip, a step after the run's first has no deadline of its own: its
    span starts when the orchestrator sent the run (the first step's command).
    """
    current = before.steps.get(reply.step)
    if current is None:
        return None
    if current.due is None:
        return _slip_sent(definition, before, reply)
    step = definition.step(reply.step)
    if (
        current.status is StepStatus.ACTIVE
        and reply.attempt == current.attempt
        and reply.type in COMMAND_REPLIES
    ):
        return "do", current.due - definition.deadline_of(step.name)
    if (
        current.status is StepStatus.COMPENSATING
        and reply.attempt == current.comp_attempt
        and reply.type in COMPENSATION_REPLIES
    ):
        return "compensate", current.due - step.compensation_timeout
    return None


def _slip_sent(definition: Saga, before: SagaState, reply: Envelope) -> tuple[str, float] | None:
    current = before.steps[reply.step]
    if current.status is not StepStatus.ACTIVE or reply.type not in COMMAND_REPLIES:
        return None
    for head, followers in definition.slips.items():
        state = before.steps[head]
        if (
            state.status is StepStatus.ACTIVE
            and state.due is not None
            and reply.step in (f.name for f in followers)
        ):
            return "do", state.due - definition.deadline_of(head)
    return None


def record_attempt(
    definition: Saga,
    before: SagaState,
    after: SagaState,
    reply: Envelope,
    *,
    traceparent: str | None,
    now: float,
) -> None:
    """Record the span of the attempt ``reply`` answers, ending ``now``, if its start is known."""
    sent = attempt_sent(definition, before, reply)
    if sent is None:
        return
    action, start = sent
    attributes: dict[str, str | int] = {
        "sagabox.saga_id": before.saga_id,
        "sagabox.saga": before.name,
        "sagabox.version": before.version,
        "sagabox.step": reply.step,
        "sagabox.attempt": reply.attempt,
        "sagabox.action": action,
        "sagabox.reply_type": reply.type,
        # What the step became: succeeded, retrying, rejected, compensated, ...
        "sagabox.outcome": after.steps[reply.step].status.value,
    }
    if reply.causation_id is not None:
        attributes["messaging.message.id"] = reply.causation_id  # the command sent
    tracing.record(
        f"saga.step {before.name}.{reply.step}",
        traceparent,
        start=start,
        end=now,
        attributes=attributes,
    )
