"""Test doubles: run a participant's handlers with no RabbitMQ and, if they allow it,
no database.

    inbox = MemoryInbox()
    reply = inventory.handle(session, command("reserve_stock", {"sku": "A", "qty": 1}),
                             inbox=inbox)
    assert reply.type == "succeeded" and inbox.sent == [("sagabox.replies", reply)]

``MemoryInbox`` follows the same rules as the PostgreSQL inbox (duplicates,
tombstones, stored replies) and logs what it was asked in ``calls``. Its savepoint
cannot undo a handler's own effects: pass a real Session (or None, for handlers that
do not use theirs) and check effects there.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from outbox_relay.message import DEFAULT_REPLY_QUEUE, Envelope, Kind
from participants.inbox import InboxEntry, InboxKey, Status, StoredReply


class MemoryInbox:
    """An in-memory participants.inbox.Inbox, for unit tests of handlers and the engine."""

    def __init__(self) -> None:
        self.rows: dict[InboxKey, InboxEntry] = {}
        self.sent: list[tuple[str, Envelope]] = []
        self.calls: list[tuple[str, Any]] = []

    def reset(self) -> None:
        self.rows.clear()
        self.sent.clear()
        self.calls.clear()

    def claim(
        self,
        key: InboxKey,
        message_id: str,
        *,
        status: Status = "done",
        reply: StoredReply | None = None,
    ) -> InboxEntry | None:
        self.calls.append(("claim", key))
        existing = self.rows.get(key)
        if existing is not None:
            return existing
        self.rows[key] = InboxEntry(message_id, status, reply or StoredReply("error", {}))
        return None

    def release(self, key: InboxKey) -> None:
        self.calls.append(("release", key))
        del self.rows[key]

    @contextmanager
    def savepoint(self, *, always: bool = False) -> Iterator[object]:
        self.calls.append(("savepoint", None))
        # Rolled back like a database's: the rows claimed and messages sent inside.
        rows, sent = dict(self.rows), list(self.sent)
        try:
            yield self
        except BaseException:
            self.rows.clear()
            self.rows.update(rows)
            self.sent[:] = sent
            raise

    def send(
        self,
        reply: Envelope,
        destination: str,
        *,
        records: Sequence[tuple[InboxKey, StoredReply]] = (),
    ) -> None:
        for key, stored in records:
            self.calls.append(("record", key))
            entry = self.rows[key]
            self.rows[key] = InboxEntry(entry.message_id, entry.status, stored)
        self.calls.append(("send", reply.message_id))
        self.sent.append((destination, reply))

    @property
    def replies(self) -> list[Envelope]:
        return [reply for _, reply in self.sent]


def command(
    type_: str,
    payload: Mapping[str, Any] | None = None,
    *,
    saga_id: str | None = None,
    step: str = "step",
    attempt: int = 1,
    kind: Kind = "command",
    saga: str = "test_saga",
    version: int = 1,
    reply_to: str = DEFAULT_REPLY_QUEUE,
    message_id: str | None = None,
) -> Envelope:
    """A command (or, with ``kind="compensation"``, a compensation) as the orchestrator sends it."""
    return Envelope(
        message_id=message_id or str(uuid.uuid4()),
        correlation_id=saga_id or str(uuid.uuid4()),
        causation_id=None,
        saga=saga,
        version=version,
        step=step,
        attempt=attempt,
        kind=kind,
        type=type_,
        payload=dict(payload or {}),
        reply_to=reply_to,
        sent_at=time.time(),
    )


def compensation(type_: str, of: Envelope, *, attempt: int = 1, **payload: Any) -> Envelope:
    """The compensation of command ``of`` (same saga and step)."""
    return command(
        type_,
        payload,
        saga_id=of.correlation_id,
        step=of.step,
        attempt=attempt,
        kind="compensation",
        saga=of.saga,
        version=of.version,
        reply_to=of.reply_to or DEFAULT_REPLY_QUEUE,
    )


def retry(of: Envelope, *, attempt: int | None = None) -> Envelope:
    """A new attempt of the same step (a new message id), as after a timeout."""
    return command(
        of.type,
        of.payload,
        saga_id=of.correlation_id,
        step=of.step,
        attempt=attempt if attempt is not None else of.attempt + 1,
        kind=of.kind,
        saga=of.saga,
        version=of.version,
        reply_to=of.reply_to or DEFAULT_REPLY_QUEUE,
    )
