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

from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.engine import Connection

from orchestrator.state import SETTLED
from orchestrator.tables import history, reply_inbox, saga
from outbox_relay.pooling import check_on_checkout
from outbox_relay.roundtrips import Tail
from outbox_relay.table import GUARD, Along

# Settings of the reply consumer's sessions (``sagabox orchestrator``). psycopg prepares
# a statement at its fifth run and PostgreSQL keeps the generic plan it then makes
# until the table is next analyzed: on a new database that plan is made while the saga
# table holds a few rows, and for a batch's UPDATE (UPDATE_SAGAS) it was a hash join
# over a sequential scan, kept while the table grew (290 pages read per batch, 0.9 ms,
# after 3,000 sagas; autovacuum's ANALYZE comes a minute or more later). Every
# statement of these sessions has an index condition for its rows (UPDATE_SAGAS says
# how); with no sequential scan in reach, their plans use it whatever the statistics
# say; and as none needs a plan for its parameters' values, the generic plan serves
# every run: without forcing it PostgreSQL planned the batch's UPDATE at every run
# (0.26 ms, as long as its execution). No JIT: a plan whose cost holds the disabled
# scan's penalty would be compiled at every run. (The relay's sessions: the same,
# outbox_relay.store.SESSION_OPTIONS.)
SERVICE_OPTIONS = "-c enable_seqscan=off -c jit=off -c plan_cache_mode=force_generic_plan"


def make_engine(
    url: str,
    *,
    pool_size: int = 5,
    max_overflow: int | None = None,
    pre_ping: bool = True,
    options: str | None = None,
) -> Engine:
    """An SQLAlchemy engine on psycopg 3 for the orchestrator's database.

    ``pre_ping`` replaces, before use, pooled connections whose session the server
    ended (outbox_relay.pooling: no round trip), so that a start after a database
    restart does not fail; it costs a ``poll`` per checkout, so only tests of what
    happens without it turn it off. ``options``: the sessions' settings (libpq's
    ``options``), such as SERVICE_OPTIONS. ``max_overflow``: connections opened past
    ``pool_size`` when needed and closed when given back (default: ``pool_size``).
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url.removeprefix(prefix)
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        json_serializer=_dumps,
        connect_args={} if options is None else {"options": options},
    )
    if pre_ping:
        check_on_checkout(engine)
    return engine


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


# The hot path (every start, reply batch and timer batch) runs these static strings
# through Connection.exec_driver_sql: building, compiling and cache-keying a Core
# statement costs about three times the CPU of executing it. Placeholders are psycopg's,
# each one cast: psycopg sends str untyped and an int as the smallest type that fits.
# Arrays go in binary format (%(name)b): psycopg's text format escapes every element in
# Python, about 20 us per JSON document, where the binary format copies it.
# Uuid columns come back as uuid.UUID from the driver, so they are selected as text
# (SagaRow.id and reply ids are compared with the str ids of envelopes); JSONB values
# are sent as text from _dumps, as the Core statements sent them.

_SAGA_COLUMNS = (
    "id::text, name, version, status, state, revision, idempotency_key,"
    " created_at, updated_at, wake_at"
)
# The same, selected from a CTE of _SAGA_COLUMNS (where id is already text).
_LOCKED_COLUMNS = _SAGA_COLUMNS.replace("id::text", "id")

INSERT_SAGA = f"""
INSERT INTO {saga.fullname}
    (id, name, version, status, state, wake_at, idempotency_key, revision)
VALUES (
    %(id)s::uuid, %(name)s::text, %(version)s::int, %(status)s::text, %(state)s::jsonb,
    %(wake_at)s::timestamptz, %(idempotency_key)s::text, 1
)
ON CONFLICT ON CONSTRAINT saga_name_idempotency_key DO NOTHING
RETURNING id"""

_HISTORY_COLUMNS = (
    "saga_id, seq, at, event, step, attempt, message_id, from_status, to_status, reason,"
    " event_data, emitted, actor"
)

# A start is one statement: the saga row and its first history row ride with the
# outbox insert as CTEs (outbox_relay.table.Along), so that the start needs no
# transaction of its own. Without an idempotency key nothing can conflict (the id is
# new) and nothing is read back.
_NEW_SAGA = f"""
INSERT INTO {saga.fullname}
    (id, name, version, status, state, wake_at, idempotency_key, revision)
VALUES (
    %(id)s::uuid, %(name)s::text, %(version)s::int, %(status)s::text, %(state)s::jsonb,
    %(wake_at)s::timestamptz, NULL, 1
)"""
_NEW_SAGA_STARTED = f"""
INSERT INTO {history.fullname} ({_HISTORY_COLUMNS})
VALUES (
    %(id)s::uuid, %(h_seq)s::int, %(h_at)s::timestamptz, %(h_event)s::text, %(h_step)s::text,
    %(h_attempt)s::int, %(h_message_id)s::uuid, %(h_from_status)s::text,
    %(h_to_status)s::text, %(h_reason)s::text, %(h_event_data)s::jsonb,
    %(h_emitted)s::jsonb, %(h_actor)s::text
)"""
# With a key, the saga row may conflict: the history row and the first commands are
# written only if it was inserted (GUARD), and the statement says whether it was.
_KEYED_SAGA_STARTED = f"""
INSERT INTO {history.fullname} ({_HISTORY_COLUMNS})
SELECT id, %(h_seq)s::int, %(h_at)s::timestamptz, %(h_event)s::text, %(h_step)s::text,
    %(h_attempt)s::int, %(h_message_id)s::uuid, %(h_from_status)s::text,
    %(h_to_status)s::text, %(h_reason)s::text, %(h_event_data)s::jsonb,
    %(h_emitted)s::jsonb, %(h_actor)s::text
FROM {GUARD}"""

FIND_BY_KEY = f"""
SELECT {_SAGA_COLUMNS} FROM {saga.fullname}
WHERE name = %(name)s::text AND idempotency_key = %(idempotency_key)s::text"""

GET_SAGA = f"SELECT {_SAGA_COLUMNS} FROM {saga.fullname} WHERE id = %(id)s::uuid"

# ORDER BY id: rows are locked in the order they are returned, so two orchestrators
# locking overlapping batches wait on each other instead of deadlocking.
LOCK_SAGAS = f"""
SELECT {_SAGA_COLUMNS} FROM {saga.fullname}
WHERE id = ANY(%(ids)b::uuid[])
ORDER BY id
FOR UPDATE"""

LOCK_DUE_SAGAS = f"""
SELECT {_SAGA_COLUMNS} FROM {saga.fullname}
WHERE wake_at <= %(now)s::timestamptz
ORDER BY wake_at
LIMIT %(limit)s::int
FOR UPDATE SKIP LOCKED"""

# One statement for the whole batch: one array per column, zipped by unnest.
# The ids twice: joined to, and as the saga scan's own condition, so that without a
# sequential scan (SERVICE_OPTIONS) its plan fetches the rows by key, not every row of
# the primary key into a hash join, as a generic plan made on a small table would.
UPDATE_SAGAS = f"""
UPDATE {saga.fullname} AS s
SET status = c.status, state = c.state, wake_at = c.wake_at, revision = c.revision,
    updated_at = now()
FROM unnest(
    %(ids)b::uuid[], %(statuses)b::text[], %(states)b::jsonb[], %(wake_ats)b::timestamptz[],
    %(revisions)b::int[]
) AS c (id, status, state, wake_at, revision)
WHERE s.id = c.id AND s.id = ANY(%(ids)b::uuid[])"""

INSERT_HISTORY = f"""
INSERT INTO {history.fullname} ({_HISTORY_COLUMNS})
SELECT * FROM unnest(
    %(h_saga_ids)b::uuid[], %(h_seqs)b::int[], %(h_ats)b::timestamptz[], %(h_events)b::text[],
    %(h_steps)b::text[], %(h_attempts)b::int[], %(h_message_ids)b::uuid[],
    %(h_from_statuses)b::text[], %(h_to_statuses)b::text[], %(h_reasons)b::text[],
    %(h_event_datas)b::jsonb[], %(h_emitteds)b::jsonb[], %(h_actors)b::text[]
)"""

# A reply batch's first statement: its sagas locked (as LOCK_SAGAS), and the ids of the
# replies that name a locked saga as it is (name, version) added to the inbox, in one
# round trip. A reply id is inserted only once its saga is locked (it joins the locked
# rows), so two orchestrators given the same reply serialise on the saga's lock, in id
# order, as before; ORDER BY inserts in id order besides. Every row carries the ids
# not seen before.
LOCK_AND_RECORD = f"""
WITH locked AS (
    SELECT id AS uid, {_SAGA_COLUMNS} FROM {saga.fullname}
    WHERE id = ANY(%(ids)b::uuid[])
    ORDER BY id
    FOR UPDATE
), recorded AS (
    INSERT INTO {reply_inbox.fullname} (message_id)
    SELECT r.m
    FROM unnest(
        %(r_ids)b::uuid[], %(r_sagas)b::uuid[], %(r_names)b::text[], %(r_versions)b::int[]
    ) AS r (m, saga_id, name, version)
    JOIN locked ON locked.uid = r.saga_id AND locked.name = r.name
        AND locked.version = r.version
    ORDER BY r.m
    ON CONFLICT DO NOTHING
    RETURNING message_id::text
)
SELECT {_LOCKED_COLUMNS}, (SELECT array_agg(message_id) FROM recorded) FROM locked"""


def _row(r: Any) -> SagaRow:
    return SagaRow(*r)


@dataclass(frozen=True, slots=True)
class NewSaga:
    """A saga as its start writes it: its row, and its first history row ``started``."""

    saga_id: str
    name: str
    version: int
    status: str
    state: Mapping[str, Any]
    wake_at: float | None
    idempotency_key: str | None
    started: Mapping[str, Any]

    def params(self) -> dict[str, Any]:
        params = _saga_params(
            saga_id=self.saga_id,
            name=self.name,
            version=self.version,
            status=self.status,
            state=self.state,
            wake_at=self.wake_at,
            idempotency_key=self.idempotency_key,
        )
        started = self.started
        params.update(
            h_seq=started["seq"],
            h_at=timestamp(started["at"]),
            h_event=started["event"],
            h_step=started.get("step"),
            h_attempt=started.get("attempt"),
            h_message_id=started.get("message_id"),
            h_from_status=started.get("from_status"),
            h_to_status=started["to_status"],
            h_reason=started.get("reason"),
            h_event_data=_dumps(started["event_data"]),
            h_emitted=_dumps(started.get("emitted")),
            h_actor=started.get("actor"),
        )
        return params


def new_saga(saga: NewSaga) -> Along:
    """A saga as statements to run with the start's outbox insert
    (``OutboxWriter.statement``). Without an idempotency key nothing can conflict and
    nothing is read back; with one, the statement's one row ends with whether the key
    was new (if not, nothing was written)."""
    if saga.idempotency_key is None:
        return Along((_NEW_SAGA, _NEW_SAGA_STARTED), saga.params())
    return Along((INSERT_SAGA, _KEYED_SAGA_STARTED), saga.params(), guarded=True)


def _saga_params(
    *,
    saga_id: str,
    name: str,
    version: int,
    status: str,
    state: Mapping[str, Any],
    wake_at: float | None,
    idempotency_key: str | None,
) -> dict[str, Any]:
    return {
        "id": saga_id,
        "name": name,
        "version": version,
        "status": status,
        "state": _dumps(state),
        "wake_at": timestamp(wake_at),
        "idempotency_key": idempotency_key,
    }


def find_by_key(conn: Connection, name: str, idempotency_key: str) -> SagaRow | None:
    params = {"name": name, "idempotency_key": idempotency_key}
    r = conn.exec_driver_sql(FIND_BY_KEY, params).first()
    return None if r is None else _row(r)


def get_saga(conn: Connection, saga_id: str) -> SagaRow | None:
    r = conn.exec_driver_sql(GET_SAGA, {"id": saga_id}).first()
    return None if r is None else _row(r)


def _rows(conn: Connection, tail: Tail | None, sql: str, params: dict[str, Any]) -> Sequence[Any]:
    """``sql``'s rows; with ``tail``, it rides with what the transaction holds back."""
    if tail is not None:
        return tail.all(conn, sql, params)
    return conn.exec_driver_sql(sql, params).all()


def lock_sagas(
    conn: Connection, saga_ids: Iterable[str], tail: Tail | None = None
) -> dict[str, SagaRow]:
    """Lock the given sagas (in id order, so two orchestrators never deadlock)."""
    ids = list(set(saga_ids))  # LOCK_SAGAS orders them
    if not ids:
        return {}
    return {r[0]: _row(r) for r in _rows(conn, tail, LOCK_SAGAS, {"ids": ids})}


def lock_due_sagas(
    conn: Connection, now: float, limit: int, tail: Tail | None = None
) -> list[SagaRow]:
    """Sagas whose earliest timer is due, skipping any another orchestrator holds."""
    params = {"now": timestamp(now), "limit": limit}
    return [_row(r) for r in _rows(conn, tail, LOCK_DUE_SAGAS, params)]


def update_sagas(conn: Connection, changes: Sequence[Mapping[str, Any]]) -> None:
    """Write new states; each change has id, status, state, wake_at (epoch), revision."""
    if changes:
        conn.exec_driver_sql(UPDATE_SAGAS, _update_params(changes))


def insert_history(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    if rows:
        conn.exec_driver_sql(INSERT_HISTORY, _history_params(rows))


def transitions(
    changes: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    *,
    notify_settled: bool = True,
) -> Along | None:
    """update_sagas(changes) and insert_history(rows) as statements to run along the
    outbox insert (outbox_relay.table.OutboxWriter.write): one round trip for all three;
    with ``notify_settled``, a NOTIFY for the sagas that settled (orchestrator.waiting)."""
    statements: list[str] = []
    params: dict[str, Any] = {}
    notify: list[tuple[str, str]] = []
    if changes:
        statements.append(UPDATE_SAGAS)
        params.update(_update_params(changes))
        settled = [f"{c['id']}:{c['status']}" for c in changes if c["status"] in SETTLED]
        for i, payload in enumerate(_payloads(settled) if notify_settled else []):
            params[f"settled{i}"] = payload
            notify.append((SETTLED_CHANNEL, f"settled{i}"))
    if rows:
        statements.append(INSERT_HISTORY)
        params.update(_history_params(rows))
    return Along(tuple(statements), params, tuple(notify)) if statements else None


# Waiters (orchestrator.waiting) LISTEN here: payload "saga id:status,..." for each saga
# that reached completed, compensated or failed in the transaction.
SETTLED_CHANNEL = "sagabox_saga_settled"
# What a waiter's LISTEN session runs about once a second: a session that only reads
# notifications (a transaction each) reports none of them to pg_stat_database until
# it runs a statement, and cannot learn that its server lost the connection
# (outbox_relay.store.check_listening says more).
LISTEN_CHECK = "SELECT 1"
# What a waiter reads: before a wait without a mark, when a marked wait times out, and
# after missing notifications (orchestrator.waiting).
# PostgreSQL plans it at every run (a generic plan's guess at the array's length makes
# that plan look dearer): about 30 us. Forcing generic plans on the waiter's session was
# measured worse: a generic plan made while the table is small is a sequential scan,
# and the session keeps it while the table grows (420 us per read in a benchmark).
SAGA_STATUSES = "SELECT id::text, status FROM sagabox.saga WHERE id = ANY(%s::uuid[])"
# PostgreSQL's NOTIFY payloads must stay under 8000 bytes.
_PAYLOAD_LIMIT = 7900


def _payloads(items: Sequence[str]) -> list[str]:
    payloads: list[str] = []
    current: list[str] = []
    size = 0
    for item in items:
        if current and size + len(item) + 1 > _PAYLOAD_LIMIT:
            payloads.append(",".join(current))
            current, size = [], 0
        current.append(item)
        size += len(item) + 1
    if current:
        payloads.append(",".join(current))
    return payloads


def _update_params(changes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "ids": [c["id"] for c in changes],
        "statuses": [c["status"] for c in changes],
        "states": [_dumps(c["state"]) for c in changes],
        "wake_ats": [timestamp(c["wake_at"]) for c in changes],
        "revisions": [c["revision"] for c in changes],
    }


def _history_params(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    # A missing or None "emitted" is stored as JSON null, as the Core insert stored it.
    return {
        "h_saga_ids": [r["saga_id"] for r in rows],
        "h_seqs": [r["seq"] for r in rows],
        "h_ats": [timestamp(r["at"]) for r in rows],
        "h_events": [r["event"] for r in rows],
        "h_steps": [r.get("step") for r in rows],
        "h_attempts": [r.get("attempt") for r in rows],
        "h_message_ids": [r.get("message_id") for r in rows],
        "h_from_statuses": [r.get("from_status") for r in rows],
        "h_to_statuses": [r["to_status"] for r in rows],
        "h_reasons": [r.get("reason") for r in rows],
        "h_event_datas": [_dumps(r["event_data"]) for r in rows],
        "h_emitteds": [_dumps(r.get("emitted")) for r in rows],
        "h_actors": [r.get("actor") for r in rows],
    }


@dataclass(frozen=True, slots=True)
class ReplyKey:
    """What the inbox needs of a reply: its id, and the saga it names."""

    message_id: str
    saga_id: str
    name: str
    version: int


def lock_and_record(
    conn: Connection,
    saga_ids: Iterable[str],
    replies: Iterable[ReplyKey],
    tail: Tail | None = None,
) -> tuple[dict[str, SagaRow], set[str]]:
    """Lock the given sagas (as ``lock_sagas``) and add to the inbox the ids of the
    ``replies`` whose saga is among them with the name and version they give, in one
    round trip: the locked rows by id, and the reply ids not seen before."""
    ids = list(set(saga_ids))
    if not ids:
        return {}, set()
    keys = list({r.message_id: r for r in replies}.values())
    params = {
        "ids": ids,
        "r_ids": [k.message_id for k in keys],
        "r_sagas": [k.saga_id for k in keys],
        "r_names": [k.name for k in keys],
        "r_versions": [k.version for k in keys],
    }
    found = _rows(conn, tail, LOCK_AND_RECORD, params)
    fresh = set(found[0][-1] or ()) if found else set()
    return {r[0]: _row(r[:-1]) for r in found}, fresh


# The cold paths (operator commands, listings, checks) keep Core statements.
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


# Completed and compensated sagas only: a failed saga waits for an operator, whatever
# its age. History rows go with their saga (ON DELETE CASCADE). SKIP LOCKED: a saga an
# operator is acting on right now is left for the next pass.
PURGE_FINISHED = f"""
WITH doomed AS (
    SELECT id FROM {saga.fullname}
    WHERE status IN ('completed', 'compensated') AND updated_at < %(cutoff)s
    ORDER BY updated_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {saga.fullname} AS s USING doomed WHERE s.id = doomed.id"""


def purge_finished_sagas(conn: Connection, older_than: dt.datetime, limit: int = 1_000) -> int:
    """Delete up to ``limit`` sagas that ended before ``older_than``, with their history."""
    return conn.exec_driver_sql(PURGE_FINISHED, {"cutoff": older_than, "limit": limit}).rowcount


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
