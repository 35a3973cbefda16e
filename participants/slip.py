"""Forwarding a routing slip: the next command of the saga instead of a reply.

In a saga defined with ``routing_slip=True`` a command may carry the commands of the
steps after it (``Envelope.slip``, docs/messages.md). When the step succeeded, its
participant sends the next one itself, in the same transaction and through the same
outbox as a reply would go; the orchestrator hears from the last step of the slip, or
from the one that stopped it, with the results of the steps before (``slip.results``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from outbox_relay.message import RESULT_REF, Envelope, Slip
from participants.inbox import StoredReply


def forward(
    command: Envelope, stored: StoredReply, *, clock: Callable[[], float] = time.time
) -> tuple[Envelope, str] | None:
    """The slip's next command and its queue, or None: reply to the orchestrator instead.

    Only a success forwards, and only with a result that holds the fields the slip
    says this step returns and fills the next payload's placeholders; anything else
    goes back to the orchestrator, which decides as it would without a slip. A
    duplicate forwards again, with the stored result and the same message id.
    """
    slip = command.slip
    if slip is None or not slip.next or stored.type != "succeeded":
        return None
    result = stored.payload.get("result")
    if not isinstance(result, Mapping) or any(name not in result for name in slip.result):
        return None
    results = {**slip.results, command.step: dict(result)}
    nxt = slip.next[0]
    try:
        payload = fill(nxt.payload, results)
    except (KeyError, IndexError, TypeError):
        return None
    envelope = Envelope(
        message_id=nxt.message_id,
        correlation_id=command.correlation_id,
        causation_id=command.message_id,
        saga=command.saga,
        version=command.version,
        step=nxt.step,
        attempt=nxt.attempt,
        kind="command",
        type=nxt.type,
        payload=payload,
        reply_to=command.reply_to,
        sent_at=clock(),
        traceparent=command.traceparent,
        slip=Slip(result=nxt.result, next=slip.next[1:], results=results),
    )
    return envelope, nxt.participant


def fill(template: Any, results: Mapping[str, Mapping[str, Any]]) -> Any:
    """``template`` with each ``{"$result": [step, key, ...]}`` placeholder resolved."""
    if isinstance(template, Mapping):
        ref = template.get(RESULT_REF) if len(template) == 1 else None
        if isinstance(ref, list) and len(ref) >= 2:
            value: Any = results[ref[0]]
            for key in ref[1:]:
                value = value[key]
            return value
        return {key: fill(value, results) for key, value in template.items()}
    if isinstance(template, list):
        return [fill(value, results) for value in template]
    return template
