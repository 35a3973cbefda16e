"""The outbox table, shared by the orchestrator and every participant, and its writer.

Any database that has this table (Alembic branch ``outbox``) can be served by a
relay. Rows are written in the caller's transaction; the relay publishes them
and deletes each row only after RabbitMQ confirmed it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection

SCHEMA = "sagabox"
NOTIFY_CHANNEL = "sagabox_outbox"

metadata = MetaData(schema=SCHEMA)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("message_id", Uuid(as_uuid=False), nullable=False),
    # Rows of one correlation id are published in id order (see docs/guarantees.md).
    Column("correlation_id", Uuid(as_uuid=False), nullable=True),
    Column("exchange", Text, nullable=False, server_default=""),
    Column("destination", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("headers", JSONB, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("available_at", DateTime(timezone=True), nullable=True),
    Column("parked_at", DateTime(timezone=True), nullable=True),
    Column("error", Text, nullable=True),
    Index("outbox_correlation_id_id", "correlation_id", "id"),
)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One row to add to the outbox: an already encoded body and where it goes."""

    message_id: str
    correlation_id: str | None
    destination: str
    body: str
    headers: Mapping[str, Any] | None = None
    exchange: str = ""


@dataclass
class OutboxWriter:
    """Adds rows to the outbox inside the caller's transaction and wakes the relays.

    NOTIFY takes a database-wide lock from the notifying commit until it ends, which
    serialises every committing transaction that notifies. So a writer notifies at
    most once per ``notify_interval`` seconds; a relay that was woken keeps polling
    at that interval while it sees traffic, so a row written without a NOTIFY waits
    at most about one interval (docs/architecture.md).
    """

    notify_interval: float = 0.05
    clock: Callable[[], float] = field(default=time.monotonic)
    _last_notify: float = field(default=float("-inf"), init=False)

    def write(self, conn: Connection, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            return
        conn.execute(
            insert(outbox),
            [
                {
                    "message_id": m.message_id,
                    "correlation_id": m.correlation_id,
                    "exchange": m.exchange,
                    "destination": m.destination,
                    "body": m.body,
                    "headers": dict(m.headers) if m.headers is not None else None,
                }
                for m in messages
            ],
        )
        now = self.clock()
        if now - self._last_notify >= self.notify_interval:
            conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})
            self._last_notify = now


def pending_rows(conn: Connection) -> int:
    """Rows still in the outbox: not yet published, or parked."""
    return int(conn.execute(select(func.count()).select_from(outbox)).scalar_one())
