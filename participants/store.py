"""Every SQL statement of the participants SDK: the inbox in PostgreSQL, and its purge.

Duplicates are told apart by the inbox's primary key (saga id, step, action), not by
message id: a new attempt of a step is a new message with the same key. The insert is
``ON CONFLICT DO NOTHING``; a concurrent transaction inserting the same key makes it
wait until that one ends, so two deliveries of one command never both apply it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from functools import cache
from typing import Any, cast

from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from outbox_relay import roundtrips
from outbox_relay.message import Envelope, ReplyType
from outbox_relay.roundtrips import Tail
from outbox_relay.table import SCHEMA, Along, OutboxWriter
from participants.context import Action
from participants.errors import BusinessFailure, SavepointNeeded
from participants.inbox import InboxEntry, InboxKey, Status, StoredReply
from participants.replies import outgoing
from participants.tables import command_inbox as inbox_table

DEFAULT_PURGE_BATCH = 1000


class PostgresInbox:
    """The inbox and outbox of one participant transaction (a SQLAlchemy Session's)."""

    def __init__(
        self,
        session: Session,
        writer: OutboxWriter | None = None,
        *,
        optimistic: bool = False,
        tail: Tail | None = None,
        reserved: Reserved | None = None,
        late: LateClaims | None = None,
    ) -> None:
        self.session = session
        self.writer = writer or OutboxWriter()
        self.optimistic = optimistic
        # The transaction's statements held back to go with its COMMIT (the worker's);
        # each statement here first sends them, so that it sees their effects.
        self.tail = tail
        # Rows this transaction inserted ahead for its messages (``reserve``).
        self.reserved = reserved
        # Keys claimed late: each row is inserted with its reply, in the reply's own
        # statement (``send``); a duplicate's insert fails, and the caller redoes the
        # transaction with claims first. Not for a transaction that handles a slip's
        # next step here (``savepoint(always=True)``): a claim inside a savepoint would
        # outlive its rollback.
        self.late = late

    def claim(
        self,
        key: InboxKey,
        message_id: str,
        *,
        status: Status = "done",
        reply: StoredReply | None = None,
    ) -> InboxEntry | None:
        if (
            self.reserved
            and status == "done"
            and reply is None
            and self.reserved.get(key) == message_id
        ):
            # Inserted by ``reserve`` for this very message: claimed, nothing to send.
            del self.reserved[key]
            return None
        if self.late is not None and status == "done" and reply is None:
            self.late[key] = message_id
            return None
        conn = self.session.connection()
        params = {
            **_key_params(key),
            "message_id": message_id,
            "status": status,
            "reply_type": reply.type if reply else None,
            "reply_payload": _dumps(reply.payload) if reply else None,
        }
        while True:
            # What the transaction held back goes with the claim: one wait, not two.
            if self.tail is not None:
                claimed = self.tail.first(conn, _CLAIM, params)
            else:
                claimed = conn.exec_driver_sql(_CLAIM, params).first()
            if claimed is not None:
                return None
            row = conn.exec_driver_sql(_LOCK, params).first()
            # None only if a purge deleted the row between the two statements: insert again.
            if row is not None:
                return InboxEntry(
                    message_id=str(row.message_id),
                    status=cast(Status, row.status),
                    reply=StoredReply(cast(ReplyType, row.reply_type), row.reply_payload or {}),
                )

    def release(self, key: InboxKey) -> None:
        if self.late is not None and self.late.pop(key, None) is not None:
            return  # never inserted
        self._connection().exec_driver_sql(_RELEASE, _key_params(key))

    def savepoint(self, *, always: bool = False) -> AbstractContextManager[object]:
        if self.optimistic and not always:
            return _no_savepoint()
        # What is held back goes out before SAVEPOINT: sent later, from inside the
        # savepoint, a rollback to it would undo the step before. A transaction holding
        # its tail (the worker's) sends it with SAVEPOINT itself (roundtrips.holding).
        conn = self.session.connection()
        if self.tail is not None and roundtrips.held(conn) is not self.tail:
            self.tail.flush(conn)
        return _savepoint(self.session)

    def send(
        self,
        reply: Envelope,
        destination: str,
        *,
        records: Sequence[tuple[InboxKey, StoredReply]] = (),
    ) -> None:
        along = None
        if records:
            params: dict[str, Any] = {}
            statements = []
            for i, (key, stored) in enumerate(records):
                params.update({f"r{i}_{k}": v for k, v in _key_params(key).items()})
                params[f"r{i}_type"] = stored.type
                params[f"r{i}_payload"] = _dumps(stored.payload)
                message_id = self.late.pop(key, None) if self.late is not None else None
                if message_id is None:
                    statements.append(_record(i))  # claimed already: its reply goes on it
                else:
                    params[f"r{i}_message_id"] = message_id
                    statements.append(_record_claimed(i))
            along = Along(tuple(statements), params)
        built = self.writer.statement([outgoing(reply, destination)], along=along)
        # A leased insert says which rows are this writer's to publish (direct publishing).
        on_row = self.writer.direct.took if self.writer.lease is not None else None
        roundtrips.run(self.session.connection(), self.tail, built, on_row)

    def _connection(self) -> Connection:
        conn = self.session.connection()
        if self.tail is not None:
            self.tail.flush(conn)
        return conn


# The hot path's statements as static SQL (exec_driver_sql): building SQLAlchemy Core
# statements per message cost more CPU than running them.
_TABLE = f"{SCHEMA}.command_inbox"
_KEY = "saga_id = %(saga_id)s AND step = %(step)s AND action = %(action)s"
_CLAIM = (
    f"INSERT INTO {_TABLE} "
    "(saga_id, step, action, message_id, status, reply_type, reply_payload) VALUES "
    "(%(saga_id)s, %(step)s, %(action)s, %(message_id)s, %(status)s, %(reply_type)s, "
    "%(reply_payload)s::jsonb) "
    "ON CONFLICT (saga_id, step, action) DO NOTHING RETURNING status"
)
_LOCK = (
    f"SELECT message_id, status, reply_type, reply_payload FROM {_TABLE} WHERE {_KEY} FOR UPDATE"
)
_RELEASE = f"DELETE FROM {_TABLE} WHERE {_KEY}"


_RESERVE = (
    f"INSERT INTO {_TABLE} (saga_id, step, action, message_id, status) "
    "SELECT k.*, 'done' FROM unnest(%(saga_ids)s::uuid[], %(steps)s::text[], "
    "%(actions)s::text[], %(message_ids)s::uuid[]) AS k "
    "ON CONFLICT (saga_id, step, action) DO NOTHING RETURNING saga_id::text, step, action"
)

# Inbox keys claimed ahead by ``reserve``, each for the message id it was inserted with.
Reserved = dict[InboxKey, str]
# Inbox keys claimed late (``PostgresInbox.late``), each for the message id claiming it.
LateClaims = dict[InboxKey, str]


def reserve(session: Session, envelopes: Sequence[Envelope], tail: Tail | None = None) -> Reserved:
    """Claim the inbox keys of a batch's commands and compensations in one statement.

    A batch handled one claim at a time waits on a round trip per message; this inserts
    every key the batch will claim first, at once, and ``PostgresInbox.claim`` then
    finds its row here instead of asking. A key already in the inbox is left out (its
    message takes the usual claim: the duplicate's stored reply, or a tombstone).

    Only messages whose saga has no other message in the batch take part: two of one
    saga may claim each other's keys (a compensation tombstones its command's; a
    routing slip's next step here claims its own), and a row inserted ahead must be
    claimed first by the message it was inserted for. Keys go in sorted, so that two
    workers given overlapping batches lock them in one order.
    """
    if len(envelopes) < 2:
        return {}  # one claim is one round trip either way
    sagas = Counter(e.correlation_id for e in envelopes)
    keys: dict[InboxKey, str] = {}
    for envelope in envelopes:
        if sagas[envelope.correlation_id] == 1 and envelope.kind != "reply":
            action: Action = "command" if envelope.kind == "command" else "compensation"
            keys[InboxKey(envelope.correlation_id, envelope.step, action)] = envelope.message_id
    if len(keys) < 2:
        return {}
    ordered = sorted(keys, key=lambda k: (k.saga_id, k.step, k.action))
    params = {
        "saga_ids": [k.saga_id for k in ordered],
        "steps": [k.step for k in ordered],
        "actions": [k.action for k in ordered],
        "message_ids": [keys[k] for k in ordered],
    }
    conn = session.connection()
    # What the transaction holds back (its BEGIN, the sweep) goes with it.
    rows = (
        tail.all(conn, _RESERVE, params)
        if tail is not None
        else conn.exec_driver_sql(_RESERVE, params)
    )
    reserved: Reserved = {}
    for saga_id, step, action in rows:
        key = InboxKey(saga_id, step, action)
        reserved[key] = keys[key]
    return reserved


def claim_late(tail: Tail, late: LateClaims) -> None:
    """Hold back the insert of each key still claimed late (none sent its reply), to go
    with the transaction's COMMIT: a duplicate then fails the commit as it would have
    failed the reply's statement."""
    for key, message_id in late.items():
        tail.defer(_CLAIM_LATE, {**_key_params(key), "message_id": message_id})
    late.clear()


def claim_conflict(error: BaseException) -> bool:
    """Whether ``error`` says a key claimed late was in the inbox already."""
    orig = getattr(error, "orig", None)
    diag = getattr(orig, "diag", None)
    return getattr(diag, "constraint_name", None) == _PRIMARY_KEY


_PRIMARY_KEY = "command_inbox_pkey"
_CLAIM_LATE = (
    f"INSERT INTO {_TABLE} (saga_id, step, action, message_id, status) VALUES "
    "(%(saga_id)s, %(step)s, %(action)s, %(message_id)s, 'done')"
)


@cache  # built once per position, not once per message
def _record_claimed(i: int) -> str:
    """The statement inserting the ``i``-th record's inbox row, claimed late, with its
    reply. No ON CONFLICT: a row already there fails the transaction."""
    return (
        f"INSERT INTO {_TABLE} "
        "(saga_id, step, action, message_id, status, reply_type, reply_payload) VALUES "
        f"(%(r{i}_saga_id)s, %(r{i}_step)s, %(r{i}_action)s, %(r{i}_message_id)s, 'done', "
        f"%(r{i}_type)s, %(r{i}_payload)s::jsonb)"
    )


@cache  # built once per position, not once per message
def _record(i: int) -> str:
    """The statement storing the ``i``-th reply of a send() on its claimed inbox row."""
    return (
        f"UPDATE {_TABLE} SET reply_type = %(r{i}_type)s, reply_payload = %(r{i}_payload)s::jsonb "
        f"WHERE saga_id = %(r{i}_saga_id)s AND step = %(r{i}_step)s AND action = %(r{i}_action)s"
    )


@contextmanager
def keeping_prepared(conn: Connection) -> Iterator[None]:
    """Statements run in this block leave psycopg's prepared statements alone.

    psycopg forgets every prepared statement of a connection (DEALLOCATE ALL, and its
    counts start again) after any statement whose command tag is ROLLBACK, in case the
    transaction changed the schema. A handler's refusal changes none; forgetting them
    made the payment service, whose declined payments roll back, plan nearly every
    statement again (docs/benchmarks.md, "30 November 2026, 13:45 UTC").
    """
    raw = roundtrips.driver(conn)
    threshold = raw.prepare_threshold
    raw.prepare_threshold = None  # psycopg neither prepares nor validates meanwhile
    try:
        yield
    finally:
        raw.prepare_threshold = threshold


def rollback_keeping_prepared(session: Session) -> None:
    """End ``session``'s transaction with a ROLLBACK that keeps the prepared statements.

    The session's own rollback, which must still follow, then finds the connection idle
    and sends nothing. After an ORM flush failed, the session takes no statement until
    that rollback: it is left to it.
    """
    transaction = session.get_transaction()
    if transaction is None or not transaction.is_active:
        return
    conn = session.connection()
    with keeping_prepared(conn):
        conn.exec_driver_sql("ROLLBACK")


@contextmanager
def _savepoint(session: Session) -> Iterator[None]:
    """``session.begin_nested()``, its rollback keeping the prepared statements."""
    # Taken first: after an ORM flush failed inside, the session gives none until its
    # rollback; and taken inside, it would send SAVEPOINT before a statement needs it.
    conn = session.connection()
    nested = session.begin_nested()
    try:
        yield
    except BaseException:
        with keeping_prepared(conn):
            nested.rollback()
        raise
    nested.commit()


@contextmanager
def _no_savepoint() -> Iterator[None]:
    try:
        yield
    except BusinessFailure as e:
        raise SavepointNeeded(e.reason) from e


def _key_params(key: InboxKey) -> dict[str, Any]:
    return {"saga_id": key.saga_id, "step": key.step, "action": key.action}


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


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
