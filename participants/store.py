"""Every SQL statement of the participants SDK: the inbox in PostgreSQL, and its purge.

Duplicates are told apart by the inbox's primary key (saga id, step, action), not by
message id: a new attempt of a step is a new message with the same key. The insert is
``ON CONFLICT DO NOTHING``; a concurrent transaction inserting the same key makes it
wait until that one ends, so two deliveries of one command never both apply it.
"""

from __future__ import annotations

import uuid
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import delete, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from outbox_relay.message import Envelope, ReplyType
from outbox_relay.table import OutboxWriter
from participants.inbox import InboxEntry, InboxKey, Status, StoredReply
from participants.replies import outgoing
from participants.tables import command_inbox as inbox_table

DEFAULT_PURGE_BATCH = 1000


class PostgresInbox:
    """The inbox and outbox of one participant transaction (a SQLAlchemy Session's)."""

    def __init__(self, session: Session, writer: OutboxWriter | None = None) -> None:
        self.session = session
        self.writer = writer or OutboxWriter()

    def claim(
        self,
        key: InboxKey,
        message_id: str,
        *,
        status: Status = "done",
        reply: StoredReply | None = None,
    ) -> InboxEntry | None:
        conn = self.session.connection()
        while True:
            inserted = conn.execute(
                insert(inbox_table)
                .values(
                    **_key_values(key),
                    message_id=uuid.UUID(message_id),
                    status=status,
                    reply_type=reply.type if reply else None,
                    reply_payload=dict(reply.payload) if reply else None,
                )
                .on_conflict_do_nothing(index_elements=["saga_id", "step", "action"])
                .returning(inbox_table.c.status)
            ).first()
            if inserted is not None:
                return None
            row = conn.execute(
                select(
                    inbox_table.c.message_id,
                    inbox_table.c.status,
                    inbox_table.c.reply_type,
                    inbox_table.c.reply_payload,
                )
                .where(*_key_clause(key))
                .with_for_update()
            ).first()
            # None only if a purge deleted the row between the two statements: insert again.
            if row is not None:
                return InboxEntry(
                    message_id=str(row.message_id),
                    status=cast(Status, row.status),
                    reply=StoredReply(cast(ReplyType, row.reply_type), row.reply_payload or {}),
                )

    def record(self, key: InboxKey, reply: StoredReply) -> None:
        self.session.connection().execute(
            update(inbox_table)
            .where(*_key_clause(key))
            .values(reply_type=reply.type, reply_payload=dict(reply.payload))
        )

    def release(self, key: InboxKey) -> None:
        self.session.connection().execute(delete(inbox_table).where(*_key_clause(key)))

    def savepoint(self) -> AbstractContextManager[object]:
        return self.session.begin_nested()

    def send(self, reply: Envelope, destination: str) -> None:
        self.writer.write(self.session.connection(), [outgoing(reply, destination)])


def purge_inbox(
    engine: Engine, older_than: timedelta | float, *, batch_size: int = DEFAULT_PURGE_BATCH
) -> int:
    """Delete inbox rows (tombstones too) received more than ``older_than`` ago.

    Deletes in batches of ``batch_size``, one short transaction each, skipping rows a
    handler holds locked, so a purge never stalls message handling. Returns the count.
    """
    age = older_than if isinstance(older_than, timedelta) else timedelta(seconds=older_than)
    key = tuple_(inbox_table.c.saga_id, inbox_table.c.step, inbox_table.c.action)
    total = 0
    while True:
        batch = (
            select(inbox_table.c.saga_id, inbox_table.c.step, inbox_table.c.action)
            .where(inbox_table.c.received_at < func.now() - age)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
        )
        with engine.begin() as conn:
            deleted = conn.execute(delete(inbox_table).where(key.in_(batch))).rowcount
        total += deleted
        if deleted < batch_size:
            return total


def _key_values(key: InboxKey) -> dict[str, Any]:
    return {"saga_id": uuid.UUID(key.saga_id), "step": key.step, "action": key.action}


def _key_clause(key: InboxKey) -> tuple[Any, ...]:
    return (
        inbox_table.c.saga_id == uuid.UUID(key.saga_id),
        inbox_table.c.step == key.step,
        inbox_table.c.action == key.action,
    )
