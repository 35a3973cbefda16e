"""Building reply envelopes and their outbox rows (pure functions)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from outbox_relay.errors import MessageError
from outbox_relay.message import REPLY_ACTOR, Envelope, ReplyType, Slip, encode
from outbox_relay.redaction import redact_text
from outbox_relay.table import OutgoingMessage
from participants.inbox import StoredReply


def reply_to(
    command: Envelope,
    reply: StoredReply,
    *,
    new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    clock: Callable[[], float] = time.time,
) -> Envelope:
    """The reply to ``command``: a new message id, caused by this very command.

    A re-emitted stored reply goes through here too, so it carries the attempt and
    causation of the duplicate it answers, which is how the orchestrator matches it.
    It keeps the command's trace context, so the saga's caller sees the reply in its trace.
    """
    if command.reply_to is None:
        raise MessageError("the command has no 'reply_to' queue to answer on")
    return Envelope(
        message_id=new_id(),
        correlation_id=command.correlation_id,
        causation_id=command.message_id,
        saga=command.saga,
        version=command.version,
        step=command.step,
        attempt=command.attempt,
        kind="reply",
        type=reply.type,
        payload=dict(reply.payload),
        reply_to=None,
        sent_at=clock(),
        traceparent=command.traceparent,
        # In a routing slip: what the steps before this one returned (participants.slip).
        slip=Slip(results=command.slip.results) if command.slip and command.slip.results else None,
    )


def outgoing(reply: Envelope, destination: str) -> OutgoingMessage:
    """The outbox row carrying ``reply`` to the orchestrator's reply queue (or, in a
    routing slip, a forwarded command to its participant's queue)."""
    actor = REPLY_ACTOR if reply.kind == "reply" else reply.type
    return OutgoingMessage(
        message_id=reply.message_id,
        correlation_id=reply.correlation_id,
        destination=destination,
        body=encode(reply, queue=destination, actor=actor),
        # The relay publishes these as AMQP headers, where tracing tools look.
        headers={"traceparent": reply.traceparent} if reply.traceparent is not None else None,
    )


def technical_failure(command: Envelope, reason: str) -> StoredReply:
    """What a message that exhausted its retries answers ('error' for a command)."""
    type_: ReplyType = "compensation_failed" if command.kind == "compensation" else "error"
    return StoredReply(type_, {"reason": redact_text(reason)})


def succeeded(result: Mapping[str, Any] | None) -> StoredReply:
    return StoredReply("succeeded", {"result": dict(result or {})})


def failed(reason: str) -> StoredReply:
    """A business refusal; card numbers in ``reason`` are masked (it is stored and sent)."""
    return StoredReply("failed", {"reason": redact_text(reason)})
