"""Handling one command or compensation inside one local transaction.

The transaction (an Inbox: store.PostgresInbox, or testing.MemoryInbox):

1. claims the idempotency key (saga id, step, action) in the inbox; a duplicate, or a
   new attempt of a step already answered, gets the stored reply and nothing runs
   (except after 'compensation_failed', which is not stored: compensations are retried).
   A worker's inbox claims late (store.PostgresInbox.late): the row is inserted with
   the reply, and a key already there fails the transaction, which is redone claiming
   first: a duplicate's handler may run once in a transaction that never commits;
2. runs the handler in a savepoint, so a BusinessFailure undoes the business effects
   but keeps the inbox row and its 'failed' reply;
3. stores the reply on the inbox row and adds it to the outbox (one statement).

A compensation first claims its own key, then the command's as a tombstone: if that
insert succeeds the command never ran (cancel-before-do), and the late command will
find the tombstone and be refused with 'cancelled'.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from sqlalchemy.orm import Session
from structlog.contextvars import bound_contextvars

from outbox_relay.errors import MessageError
from outbox_relay.message import Envelope
from outbox_relay.redaction import redact_text
from participants.context import Context, Handler, log_context
from participants.errors import BusinessFailure, SavepointNeeded
from participants.inbox import CANCELLED, Inbox, InboxKey, StoredReply
from participants.replies import failed, reply_to, succeeded
from participants.slip import forward

log = structlog.get_logger(__name__)

# Prometheus metrics of the participant SDK (served by ``sagabox participant`` when
# SAGABOX_METRICS_PORT is set). A worker counts them once the transaction committed.
HANDLED = Counter(
    "sagabox_participant_handled",
    "Commands and compensations handled (duplicates excluded), by the reply they got",
    ["participant", "kind", "type", "outcome"],
)
DUPLICATES = Counter(
    "sagabox_participant_inbox_duplicates",
    "Deliveries absorbed by the inbox (answered with the stored reply, nothing re-run)",
    ["participant", "kind", "type"],
)
HANDLER_SECONDS = Histogram(
    "sagabox_participant_handler_seconds",
    "Time spent in the handler function (in its savepoint)",
    ["participant", "type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def resolve(handlers: Mapping[str, Handler], envelope: Envelope) -> Handler:
    """The handler for ``envelope``, or MessageError if this participant cannot take it."""
    handler = handlers.get(envelope.type)
    if handler is None:
        raise MessageError(f"no handler for {envelope.kind} {envelope.type!r}")
    if envelope.kind != handler.action:
        raise MessageError(f"{envelope.type!r} is a {handler.action}, got kind {envelope.kind!r}")
    if envelope.reply_to is None:
        raise MessageError(f"{envelope.kind} has no 'reply_to' queue to answer on")
    return handler


def handle(
    service: str,
    handlers: Mapping[str, Handler],
    session: Session,
    envelope: Envelope,
    inbox: Inbox,
) -> Envelope:
    """Apply ``envelope`` at most once and add its reply to the outbox; return the reply
    (or, in a routing slip, the next command, forwarded instead of a reply).

    A slip's next command for this same participant is handled here too, in the same
    transaction, with no message in between (see _locally); what goes out is the
    answer of the last step handled.

    Runs in the caller's transaction; the caller commits. Raises MessageError for a
    message this participant cannot take, and lets technical errors through.
    """
    return _handle(service, handlers, session, envelope, inbox)


Records = tuple[tuple[InboxKey, StoredReply], ...]


def _handle(
    service: str,
    handlers: Mapping[str, Handler],
    session: Session,
    envelope: Envelope,
    inbox: Inbox,
    *,
    records: Records = (),
) -> Envelope:
    handler = resolve(handlers, envelope)
    if handler.action == "command":
        stored, key = _command(service, handler, session, envelope, inbox)
    else:
        stored, key = _compensation(service, handler, session, envelope, inbox)
    if key is not None:
        records = (*records, (key, stored))
    forwarded = forward(envelope, stored)
    if forwarded is not None:
        message, queue = forwarded
        local = queue == service and message.type in handlers
        log.info(
            "slip_forwarded",
            next_step=message.step,
            next_participant=queue,
            next_message_id=message.message_id,
            local=local,
        )
        if local:
            answer = _locally(service, handlers, session, message, inbox, records=records)
            if answer is not None:
                return answer
        inbox.send(message, queue, records=records)
        return message
    reply = reply_to(envelope, stored)
    assert envelope.reply_to is not None  # resolve() checked it
    inbox.send(reply, envelope.reply_to, records=records)
    return reply


def _locally(
    service: str,
    handlers: Mapping[str, Handler],
    session: Session,
    message: Envelope,
    inbox: Inbox,
    *,
    records: Records,
) -> Envelope | None:
    """Handle the slip's next command, bound for this participant, right here.

    It is handled as if it had come back through the broker (its own inbox key, its
    own message id, logged with its own context), minus the outbox row, the relay,
    the broker and a second transaction. The earlier steps' replies are stored with
    the last one's, in one statement. If it fails technically it is rolled back to
    its savepoint and None is returned: it then goes out as a message after all, so
    that the steps before it commit and its own retries are its own.
    """
    try:
        with inbox.savepoint(always=True), bound_contextvars(**log_context(service, message)):
            return _handle(service, handlers, session, message, inbox, records=records)
    except SavepointNeeded:
        raise  # the whole transaction is redone with savepoints
    except Exception as e:
        log.warning(
            "slip_local_failed",
            next_step=message.step,
            next_message_id=message.message_id,
            error=redact_text(str(e) or repr(e)),
        )
        return None


# The reply, and the claimed inbox key to store it on (None: nothing to store).
Answer = tuple[StoredReply, InboxKey | None]


def _command(
    service: str, handler: Handler, session: Session, envelope: Envelope, inbox: Inbox
) -> Answer:
    key = InboxKey(envelope.correlation_id, envelope.step, "command")
    existing = inbox.claim(key, envelope.message_id)
    if existing is not None:
        if existing.status == "tombstone":
            log.info("command_cancelled", reason="compensated before it arrived")
            _count(service, envelope, existing.reply)
        else:
            log.info(
                "inbox_duplicate_skipped",
                first_message_id=existing.message_id,
                reply_type=existing.reply.type,
            )
            _duplicate(service, envelope)
        return existing.reply, None
    stored = _run(service, handler, session, envelope, inbox)
    _count(service, envelope, stored)
    return stored, key


def _compensation(
    service: str, handler: Handler, session: Session, envelope: Envelope, inbox: Inbox
) -> Answer:
    key = InboxKey(envelope.correlation_id, envelope.step, "compensation")
    existing = inbox.claim(key, envelope.message_id)
    if existing is not None:
        log.info(
            "inbox_duplicate_skipped",
            first_message_id=existing.message_id,
            reply_type=existing.reply.type,
        )
        _duplicate(service, envelope)
        return existing.reply, None
    command_key = InboxKey(envelope.correlation_id, envelope.step, "command")
    command = inbox.claim(command_key, envelope.message_id, status="tombstone", reply=CANCELLED)
    if command is None:
        log.info("command_tombstoned")
        stored = StoredReply("compensated", {"skipped": "the command was never applied"})
    elif command.status == "done" and command.reply.type == "succeeded":
        result = command.reply.payload.get("result")
        stored = _run(service, handler, session, envelope, inbox, command_result=result)
        if stored.type == "compensation_failed":
            # Not stored: the orchestrator retries a compensation until it succeeds, and
            # each attempt must run the handler again (docs/messages.md).
            inbox.release(key)
            _count(service, envelope, stored)
            return stored, None
    else:
        log.info("compensation_skipped", command_reply=command.reply.type)
        stored = StoredReply(
            "compensated", {"skipped": f"the command was not applied ({command.reply.type})"}
        )
    _count(service, envelope, stored)
    return stored, key


def _count(service: str, envelope: Envelope, stored: StoredReply) -> None:
    _record(HANDLED.labels(service, envelope.kind, envelope.type, stored.type).inc)


def _duplicate(service: str, envelope: Envelope) -> None:
    _record(DUPLICATES.labels(service, envelope.kind, envelope.type).inc)


# Inside on_commit(): metric updates wait for the transaction's commit, so that a
# transaction rolled back and redone (a batch, a refusal without savepoint) counts once.
_deferred: ContextVar[list[Callable[[], None]] | None] = ContextVar(
    "sagabox_deferred_metrics", default=None
)


def _record(update: Callable[[], None]) -> None:
    pending = _deferred.get()
    if pending is None:
        update()
    else:
        pending.append(update)


@contextmanager
def on_commit() -> Iterator[Callable[[], None]]:
    """Hold the metric updates of the handling in this block; call what it yields once
    the transaction committed (leaving the block without calling it drops them)."""
    pending: list[Callable[[], None]] = []
    token = _deferred.set(pending)

    def committed() -> None:
        for update in pending:
            update()
        pending.clear()

    try:
        yield committed
    finally:
        _deferred.reset(token)


def _run(
    service: str,
    handler: Handler,
    session: Session,
    envelope: Envelope,
    inbox: Inbox,
    *,
    command_result: Mapping[str, Any] | None = None,
) -> StoredReply:
    ctx = Context.of(service, envelope, command_result)
    started: float | None = time.perf_counter()
    try:
        with inbox.savepoint():
            result = handler.fn(session, envelope.payload, ctx)
    except SavepointNeeded:
        # This run is rolled back and redone: only the redo counts.
        started = None
        raise
    except BusinessFailure as e:
        # The reason is stored, sent and logged: never with a card number in it.
        reason = redact_text(e.reason)
        log.info(f"{handler.action}_refused", reason=reason)
        if handler.action == "compensation":
            return StoredReply("compensation_failed", {"reason": reason})
        return failed(reason)
    finally:
        if started is not None:
            elapsed = time.perf_counter() - started
            _record(partial(HANDLER_SECONDS.labels(service, envelope.type).observe, elapsed))
    log.info(f"{handler.action}_applied")
    if handler.action == "compensation":
        return StoredReply("compensated", {})
    return succeeded(result)
