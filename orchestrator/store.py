"""Every SQL statement of the orchestrator, over a SQLAlchemy Connection.

The engine (orchestrator.engine) owns transactions; these functions only run
statements inside whichever transaction they are given.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, bindparam, create_engine, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection

from orchestrator.tables import history, reply_inbox, saga


def make_engine(url: str, *, pool_size: int = 5, pre_ping: bool = True) -> Engine:
    """An SQLAlchemy engine on psycopg 3 for the orchestrator's database.

    ``pre_ping`` checks each connection before use (a round trip per transaction): right
    for an application calling ``start``; a service that retries a failed batch anyway
    (``sagabox orchestrator``) turns it off.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url.removeprefix(prefix)
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        json_serializer=_dumps,
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def timestamp(epoch: float | None) -> dt.datetime | None:
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, dt.UTC)


@dataclass(frozen=True, slots=True)
class SagaRow:
    id: str
    name: str
    version: int
    status: str
    state: Mapping[str, Any]
    revision: int
    idempotency_key: str | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    wake_at: dt.datetime | None = None


_ROW_COLUMNS = (
    saga.c.id,
    saga.c.name,
    saga.c.version,
    saga.c.status,
    saga.c.state,
    saga.c.revision,
    saga.c.idempotency_key,
    saga.c.created_at,
    saga.c.updated_at,
    saga.c.wake_at,
)


def _row(r: Any) -> SagaRow:
    return SagaRow(*r)


def insert_saga(
    conn: Connection,
    *,
    saga_id: str,
    name: str,
    version: int,
    status: str,
    state: Mapping[str, Any],
    wake_at: float | None,
    idempotency_key: str | None,
) -> bool:
    """Insert a new saga; False when one with this (name, idempotency key) exists."""
    stmt = (
        insert(saga)
        .values(
            id=saga_id,
            name=name,
            version=version,
            status=status,
            state=state,
            wake_at=timestamp(wake_at),
            idempotency_key=idempotency_key,
            revision=1,
        )
        .on_conflict_do_nothing(constraint="saga_name_idempotency_key")
        .returning(saga.c.id)
    )
    return conn.execute(stmt).first() is not None


def find_by_key(conn: Connection, name: str, idempotency_key: str) -> SagaRow | None:
    stmt = select(*_ROW_COLUMNS).where(
        saga.c.name == name, saga.c.idempotency_key == idempotency_key
    )
    r = conn.execute(stmt).first()
    return None if r is None else _row(r)


def get_saga(conn: Connection, saga_id: str) -> SagaRow | None:
    r = conn.execute(select(*_ROW_COLUMNS).where(saga.c.id == saga_id)).first()
    return None if r is None else _row(r)


def lock_sagas(conn: Connection, saga_ids: Iterable[str]) -> dict[str, SagaRow]:
    """Lock the given sagas (in id order, so two orchestrators never deadlock)."""
    ids = sorted(set(saga_ids))
    if not ids:
        return {}
    stmt = select(*_ROW_COLUMNS).where(saga.c.id.in_(ids)).order_by(saga.c.id).with_for_update()
    return {r.id: _row(r) for r in conn.execute(stmt)}


def lock_due_sagas(conn: Connection, now: float, limit: int) -> list[SagaRow]:
    """Sagas whose earliest timer is due, skipping any another orchestrator holds."""
    stmt = (
        select(*_ROW_COLUMNS)
        .where(saga.c.wake_at <= timestamp(now))
        .order_by(saga.c.wake_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [_row(r) for r in conn.execute(stmt)]


def update_sagas(conn: Connection, changes: Sequence[Mapping[str, Any]]) -> None:
    """Write new states; each change has id, status, state, wake_at (epoch), revision."""
    if not changes:
        return
    stmt = (
        update(saga)
        .where(saga.c.id == bindparam("b_id"))
        .values(
            status=bindparam("b_status"),
            state=bindparam("b_state"),
            wake_at=bindparam("b_wake_at"),
            revision=bindparam("b_revision"),
            updated_at=func.now(),
        )
    )
    conn.execute(
        stmt,
        [
            {
                "b_id": c["id"],
                "b_status": c["status"],
                "b_state": c["state"],
                "b_wake_at": timestamp(c["wake_at"]),
                "b_revision": c["revision"],
            }
            for c in changes
        ],
    )


def insert_history(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    if rows:
        conn.execute(history.insert(), [{**r, "at": timestamp(r["at"])} for r in rows])


def record_replies(conn: Connection, message_ids: Iterable[str]) -> set[str]:
    """Add reply ids to the inbox; return those not seen before.

    Sorted so that two transactions inserting overlapping ids wait on each other
    in the same order instead of deadlocking.
    """
    ids = sorted(set(message_ids))
    if not ids:
        return set()
    stmt = (
        insert(reply_inbox)
        .values([{"message_id": m} for m in ids])
        .on_conflict_do_nothing()
        .returning(reply_inbox.c.message_id)
    )
    return {r[0] for r in conn.execute(stmt)}


def load_history(conn: Connection, saga_id: str) -> list[dict[str, Any]]:
    stmt = select(history).where(history.c.saga_id == saga_id).order_by(history.c.seq)
    return [dict(r._mapping) for r in conn.execute(stmt)]


def list_sagas(
    conn: Connection,
    *,
    status: str | None = None,
    name: str | None = None,
    older_than: dt.datetime | None = None,
    limit: int = 100,
) -> list[SagaRow]:
    stmt = select(*_ROW_COLUMNS).order_by(saga.c.created_at).limit(limit)
    if status is not None:
        stmt = stmt.where(saga.c.status == status)
    if name is not None:
        stmt = stmt.where(saga.c.name == name)
    if older_than is not None:
        stmt = stmt.where(saga.c.created_at < older_than)
    return [_row(r) for r in conn.execute(stmt)]


def purge_reply_inbox(conn: Connection, older_than: dt.datetime, limit: int = 10_000) -> int:
    """Delete up to ``limit`` reply ids received before ``older_than``."""
    stmt = reply_inbox.delete().where(
        reply_inbox.c.message_id.in_(
            select(reply_inbox.c.message_id)
            .where(reply_inbox.c.received_at < older_than)
            .limit(limit)
            .scalar_subquery()
        )
    )
    return conn.execute(stmt).rowcount


def history_gaps(conn: Connection) -> list[str]:
    """Sagas whose history is not seq 1..n without gap or repeat (an invariant of chaos runs)."""
    query = select(
        history.c.saga_id,
        func.count(),
        func.count(history.c.seq.distinct()),
        func.min(history.c.seq),
        func.max(history.c.seq),
    ).group_by(history.c.saga_id)
    return [
        f"saga {saga_id}: history of {n} rows, {distinct} distinct seq {low}..{high}"
        for saga_id, n, distinct, low, high in conn.execute(query)
        if not (n == distinct == high - low + 1 and low in (0, 1))
    ]


def count_by_status(conn: Connection, statuses: Iterable[str]) -> int:
    query = select(func.count()).select_from(saga).where(saga.c.status.in_(list(statuses)))
    return int(conn.execute(query).scalar_one())
