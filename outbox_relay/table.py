"""The outbox table, shared by the orchestrator and every participant, and its writer.

Any database that has this table (Alembic branch ``outbox``) can be served by a
relay. Rows are written in the caller's transaction; the relay publishes them
and deletes each row only after RabbitMQ confirmed it.
"""

from __future__ import annotations

import json
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
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection

SCHEMA = "sagabox"
NOTIFY_CHANNEL = "sagabox_outbox"
# The payload of a NOTIFY after which the writer may add rows without one for a while
# (OutboxWriter): relays poll for SAGABOX_RELAY_ACTIVE_WINDOW seconds after it.
DEBOUNCING = "debouncing"

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
class DirectRows:
    """A writer's leased rows, from its transaction's insert to their deletion.

    ``wrote`` / ``took`` (the insert's result) in a transaction; ``committed`` makes
    the leased ones ``ready`` to publish; the publisher then reports each one
    ``confirmed`` (to delete) or ``refused`` (nacked or returned: handed to the relay);
    ``sweep`` gives the statements that do both, ``swept`` forgets them once committed.
    """

    # (row id, message) of committed leased rows, to publish.
    ready: list[tuple[int, OutgoingMessage]] = field(default_factory=list)
    _written: dict[str, OutgoingMessage] = field(default_factory=dict)
    _leased: list[tuple[int, str]] = field(default_factory=list)
    _confirmed: list[int] = field(default_factory=list)
    _refused: list[int] = field(default_factory=list)
    _sweeping: tuple[int, int] = (0, 0)

    def wrote(self, messages: Sequence[OutgoingMessage]) -> None:
        for m in messages:
            self._written[m.message_id] = m

    def took(self, row: Sequence[Any] | None) -> None:
        """The row of a leased insert (``OutboxWriter``): its last two columns, the ids
        and message ids of the rows it leased."""
        if row is not None and row[-2]:
            self._leased.extend(zip(row[-2], row[-1], strict=True))

    def committed(self) -> None:
        self.ready.extend((i, self._written[m]) for i, m in self._leased if m in self._written)
        self._written.clear()
        self._leased.clear()

    def rolled_back(self) -> None:
        self._written.clear()
        self._leased.clear()
        self._sweeping = (0, 0)

    def confirmed(self, row_id: int) -> None:
        self._confirmed.append(row_id)

    def refused(self, row_id: int) -> None:
        self._refused.append(row_id)

    def sweep(self) -> list[tuple[str, dict[str, Any]]]:
        """Statements that delete the confirmed rows and hand the refused ones to the
        relay (then woken), to run in the caller's transaction; ``swept`` after it."""
        self._sweeping = (len(self._confirmed), len(self._refused))
        statements: list[tuple[str, dict[str, Any]]] = []
        if self._confirmed:
            statements.append((_DELETE_CONFIRMED, {"ids": list(self._confirmed)}))
        if self._refused:
            statements.append((_RELEASE_REFUSED, {"ids": list(self._refused)}))
        return statements

    def swept(self) -> None:
        confirmed, refused = self._sweeping
        del self._confirmed[:confirmed]
        del self._refused[:refused]
        self._sweeping = (0, 0)

    @property
    def unswept(self) -> bool:
        return bool(self._confirmed or self._refused)


# A row of the same saga written behind a leased one is the relay's, which could not
# claim it before: woken once the leased row is gone (it would poll only idly). The
# statement's snapshot still holds the rows it deletes: they must not count, or every
# sweep wakes every relay for an empty claim (and each NOTIFY serialises a commit).
_DELETE_CONFIRMED = (
    f"WITH deleted AS (DELETE FROM {SCHEMA}.outbox WHERE id = ANY(%(ids)s::bigint[]) "
    "RETURNING correlation_id) "
    f"SELECT pg_notify('{NOTIFY_CHANNEL}', '') WHERE EXISTS (SELECT FROM {SCHEMA}.outbox o "
    "JOIN deleted d ON o.correlation_id = d.correlation_id "
    "WHERE o.id <> ALL(%(ids)s::bigint[]))"
)
# Refused: due now, for a relay to retry with backoff or park, as any row it publishes.
_RELEASE_REFUSED = (
    f"WITH released AS (UPDATE {SCHEMA}.outbox SET available_at = NULL "
    "WHERE id = ANY(%(ids)s::bigint[]) RETURNING 1) "
    f"SELECT pg_notify('{NOTIFY_CHANNEL}', '') FROM released LIMIT 1"
)


@dataclass
class OutboxWriter:
    """Adds rows to the outbox inside the caller's transaction and wakes the relays.

    NOTIFY takes a database-wide lock from the notifying commit until it ends, which
    serialises every committing transaction that notifies. So a busy writer (rows less
    than ``quiet_gap`` apart) notifies at most once per ``notify_interval`` seconds. It
    says so first: it skips a NOTIFY only within ``notify_interval`` of one whose payload
    is ``DEBOUNCING`` (sent while it was busy in the last ``busy_memory`` seconds), and
    a relay keeps polling for a while after such a NOTIFY, so a row written without one
    waits at most about one interval (docs/relay.md). A writer that has not been busy
    lately notifies on every row with an empty payload: at low load the relay claims on
    NOTIFYs alone, with no polling.
    """

    notify_interval: float = 0.05
    quiet_gap: float = 0.005
    # How long after its last busy write a writer's NOTIFYs still say DEBOUNCING.
    busy_memory: float = 1.0
    clock: Callable[[], float] = field(default=time.monotonic)
    _last_notify: float = field(default=float("-inf"), init=False)
    _last_write: float = field(default=float("-inf"), init=False)
    _last_busy: float = field(default=float("-inf"), init=False)
    # Whether the last NOTIFY announced DEBOUNCING (only then may a NOTIFY be skipped).
    _debouncing: bool = field(default=False, init=False)
    # Direct publishing (docs/relay.md): rows are written leased to this writer for
    # ``lease`` seconds, unless an earlier row of their correlation id is in the outbox,
    # and its process publishes them after the commit; None: the relay publishes all.
    lease: float | None = None
    direct: DirectRows = field(default_factory=DirectRows, init=False)

    def write(
        self,
        conn: Connection,
        messages: Sequence[OutgoingMessage],
        *,
        along: Along | None = None,
    ) -> None:
        """Insert ``messages`` (and NOTIFY, when due) in one statement.

        ``along`` holds data-modifying statements of the caller's to run in the same
        round trip (CTEs of the insert), such as the participant's inbox update or the
        orchestrator's new saga states and history rows.
        """
        built = self.statement(messages, along=along)
        if built is not None:
            conn.exec_driver_sql(*built)

    def leases(self, messages: Sequence[OutgoingMessage], *, along: Along | None = None) -> bool:
        """Whether ``statement`` writes ``messages`` leased to this writer: then its one
        row goes to ``direct.took``."""
        guarded = along is not None and along.guarded
        return self.lease is not None and bool(messages) and not guarded

    def statement(
        self,
        messages: Sequence[OutgoingMessage],
        *,
        along: Along | None = None,
        lease: bool = True,
    ) -> tuple[str, dict[str, Any]] | None:
        """What ``write`` runs (SQL and parameters), for a caller that runs it later in
        the same transaction (roundtrips.Tail); None if there is nothing to run. With a
        ``guarded`` ``along`` it returns one row, whose last column the caller reads.
        ``lease=False``: written for the relay even by a leasing writer (``leases``)."""
        if not messages:
            if along is not None:
                return along.alone(), dict(along.params)
            return None
        params: dict[str, Any]
        guarded = along is not None and along.guarded
        if lease and self.leases(messages, along=along):
            return self._leased(messages, along)
        if len(messages) == 1 and not guarded:
            m = messages[0]
            insert = _INSERT_ONE
            params = _one_row(m)
        else:
            insert = _INSERT_MANY_GUARDED if guarded else _INSERT_MANY
            params = _rows(messages)
        ctes = []
        selects: list[str] = []
        if along is not None:
            ctes += along.ctes()
            params.update(along.params)
            selects += along.notifications()
            if along.guarded:
                selects.append(_GUARD_RESULT)
        now = self.clock()
        busy = now - self._last_write < self.quiet_gap
        self._last_write = now
        if busy:
            self._last_busy = now
            if self._debouncing and now - self._last_notify < self.notify_interval:
                if selects:
                    ctes.append(f"written AS ({insert})")
                    sql = f"WITH {', '.join(ctes)} SELECT {', '.join(selects)}"
                else:
                    sql = f"WITH {', '.join(ctes)} {insert}" if ctes else insert
                return sql, params
        ctes.append(f"written AS ({insert})")
        # A writer busy lately keeps saying so, so that it may skip its next NOTIFYs
        # without first sending one more (each one serialises a commit).
        debouncing = now - self._last_busy < self.busy_memory
        payload = DEBOUNCING if debouncing else ""
        selects.insert(0, f"pg_notify('{NOTIFY_CHANNEL}', '{payload}')")
        sql = f"WITH {', '.join(ctes)} SELECT {', '.join(selects)}"
        self._last_notify, self._debouncing = now, debouncing
        return sql, params

    def rolled_back(self, *, leasing: bool = True) -> None:
        """The caller's transaction failed: its NOTIFY may never have gone out, so the
        next write must not be skipped on the strength of it; and (``leasing``: it was
        the thread that leases) what it leased or swept is forgotten."""
        self._last_notify, self._debouncing = float("-inf"), False
        if leasing:
            self.direct.rolled_back()

    def _leased(
        self, messages: Sequence[OutgoingMessage], along: Along | None
    ) -> tuple[str, dict[str, Any]]:
        self.direct.wrote(messages)
        return leased_statement(messages, along=along, lease=float(self.lease or 0.0))


def leased_statement(
    messages: Sequence[OutgoingMessage], *, along: Along | None, lease: float
) -> tuple[str, dict[str, Any]]:
    """The insert of ``messages`` leased for ``lease`` seconds to whoever runs it; its one
    row's last two columns list the ids and message ids of the rows it leased
    (``DirectRows.took``), followed by the guard's column with a ``guarded`` ``along``.
    The relay is woken only for rows it must publish itself (an earlier row of their
    correlation id). Touches no writer's state: any thread may build it."""
    params: dict[str, Any]
    guarded = along is not None and along.guarded
    if len(messages) == 1 and not guarded:
        # One row (a reply): scalars, and a statement PostgreSQL runs about as fast
        # as the plain insert (the arrays' form cost it three times as much).
        m = messages[0]
        insert, tail = _INSERT_ONE_LEASED, _LEASED_ONE
        params = _one_row(m)
    else:
        # Guarded, the insert may write nothing: the tail's subqueries still give a row.
        insert = _INSERT_MANY_LEASED_GUARDED if guarded else _INSERT_MANY_LEASED
        tail = _LEASED_MANY
        params = _rows(messages)
    params["lease"] = lease
    ctes: list[str] = []
    selects: list[str] = []
    if along is not None:
        ctes += along.ctes()
        params.update(along.params)
        selects += along.notifications()
    ctes.append(f"written AS ({insert})")
    selects.append(tail)
    if guarded:
        selects.append(_GUARD_RESULT)
    return f"WITH {', '.join(ctes)} SELECT {', '.join(selects)}", params


@dataclass(frozen=True, slots=True)
class Along:
    """Data-modifying statements (``%(name)s`` parameters, none named like the outbox
    insert's) to run in the outbox insert's round trip, as CTEs; and NOTIFYs to send in
    that same statement (the channel, and the name of the parameter holding the payload).
    """

    statements: tuple[str, ...]
    params: Mapping[str, Any]
    notify: tuple[tuple[str, str], ...] = ()
    # The first statement (a RETURNING one, the CTE named GUARD) decides: the messages
    # are inserted only if it returned a row, and the whole statement returns one row
    # whose last column says whether it did.
    guarded: bool = False

    def ctes(self) -> list[str]:
        return [f"along{i} AS ({sql})" for i, sql in enumerate(self.statements)]

    def notifications(self) -> list[str]:
        return [f"pg_notify('{channel}', %({param})s)" for channel, param in self.notify]

    def alone(self) -> str:
        """The statements as one, when there is no row to insert."""
        selects = self.notifications() + ([_GUARD_RESULT] if self.guarded else [])
        if selects:
            return f"WITH {', '.join(self.ctes())} SELECT {', '.join(selects)}"
        *first, last = self.statements
        if not first:
            return last
        return f"WITH {', '.join(self.ctes()[:-1])} {last}"


# Static SQL through exec_driver_sql: building a Core statement per call cost ~3x the
# CPU of executing it. Arrays go in binary (%()b): psycopg escapes text arrays element
# by element in Python. WITH ORDINALITY keeps the ids in the order given, which the relay
# follows per correlation id.
_COLUMNS = "(message_id, correlation_id, exchange, destination, body, headers)"
# One row (a participant's reply): scalars, cheaper to adapt than arrays.
_INSERT_ONE = (
    f"INSERT INTO {SCHEMA}.outbox {_COLUMNS} VALUES (%(message_id)s, %(correlation_id)s, "
    "%(exchange)s, %(destination)s, %(body)s, %(headers)s::jsonb)"
)
_INSERT_MANY_FROM = (
    f"INSERT INTO {SCHEMA}.outbox "
    f"{_COLUMNS} SELECT m, c, e, d, b, h FROM unnest("
    "%(message_ids)b::uuid[], %(correlation_ids)b::uuid[], %(exchanges)b::text[], "
    "%(destinations)b::text[], %(bodies)b::text[], %(headers)b::jsonb[]"
    ") WITH ORDINALITY AS t(m, c, e, d, b, h, n)"
)
_INSERT_MANY = f"{_INSERT_MANY_FROM} ORDER BY n"
# Direct publishing: a row is leased (available_at ahead, so relays leave it alone) only
# if no row of its correlation id is in the outbox, which keeps the order per saga: an
# earlier row (parked, backing off, leased to another writer) makes it the relay's.
_LEASE = (
    "CASE WHEN EXISTS (SELECT FROM {schema}.outbox o WHERE o.correlation_id = {c}) "
    "THEN NULL ELSE now() + make_interval(secs => %(lease)s) END"
)
_LEASED_COLUMNS = "(message_id, correlation_id, exchange, destination, body, headers, available_at)"
_RETURNING_LEASED = "RETURNING id, message_id, available_at IS NOT NULL AS leased"
_INSERT_ONE_LEASED = (
    f"INSERT INTO {SCHEMA}.outbox {_LEASED_COLUMNS} VALUES (%(message_id)s, %(correlation_id)s, "
    "%(exchange)s, %(destination)s, %(body)s, %(headers)s::jsonb, "
    + _LEASE.format(schema=SCHEMA, c="%(correlation_id)s::uuid")
    + f") {_RETURNING_LEASED}"
)
_INSERT_MANY_LEASED_FROM = (
    f"INSERT INTO {SCHEMA}.outbox {_LEASED_COLUMNS} SELECT m, c, e, d, b, h, "
    + _LEASE.format(schema=SCHEMA, c="c")
    + " FROM unnest("
    "%(message_ids)b::uuid[], %(correlation_ids)b::uuid[], %(exchanges)b::text[], "
    "%(destinations)b::text[], %(bodies)b::text[], %(headers)b::jsonb[]"
    ") WITH ORDINALITY AS t(m, c, e, d, b, h, n)"
)
_INSERT_MANY_LEASED = f"{_INSERT_MANY_LEASED_FROM} ORDER BY n {_RETURNING_LEASED}"
# What a leased insert returns (one row): a NOTIFY if a row is the relay's, then the
# ids and message ids of the rows leased (NULL if none).
_NOTIFY = f"pg_notify('{NOTIFY_CHANNEL}', '')"
_LEASED_ONE = (
    f"CASE WHEN leased THEN NULL ELSE {_NOTIFY} END, "
    "CASE WHEN leased THEN ARRAY[id] END, CASE WHEN leased THEN ARRAY[message_id::text] END "
    "FROM written"
)
_LEASED_MANY = (
    f"(SELECT {_NOTIFY} FROM written WHERE NOT leased LIMIT 1), "
    "ARRAY(SELECT id FROM written WHERE leased ORDER BY id), "
    "ARRAY(SELECT message_id::text FROM written WHERE leased ORDER BY id)"
)
# Along.guarded: the CTE the messages depend on, and what the statement returns of it.
GUARD = "along0"
_INSERT_MANY_GUARDED = f"{_INSERT_MANY_FROM} WHERE EXISTS (SELECT FROM {GUARD}) ORDER BY n"
_INSERT_MANY_LEASED_GUARDED = (
    f"{_INSERT_MANY_LEASED_FROM} WHERE EXISTS (SELECT FROM {GUARD}) ORDER BY n {_RETURNING_LEASED}"
)
_GUARD_RESULT = f"EXISTS (SELECT FROM {GUARD})"


def _one_row(m: OutgoingMessage) -> dict[str, Any]:
    """The parameters of a one-row insert (scalars)."""
    return {
        "message_id": m.message_id,
        "correlation_id": m.correlation_id,
        "exchange": m.exchange,
        "destination": m.destination,
        "body": m.body,
        "headers": None if m.headers is None else _dumps(m.headers),
    }


def _rows(messages: Sequence[OutgoingMessage]) -> dict[str, Any]:
    """The parameters of a many-row insert (arrays, in the messages' order)."""
    return {
        "message_ids": [m.message_id for m in messages],
        "correlation_ids": [m.correlation_id for m in messages],
        "exchanges": [m.exchange for m in messages],
        "destinations": [m.destination for m in messages],
        "bodies": [m.body for m in messages],
        "headers": [None if m.headers is None else _dumps(m.headers) for m in messages],
    }


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def pending_rows(conn: Connection) -> int:
    """Rows still in the outbox: not yet published, or parked."""
    return int(conn.execute(select(func.count()).select_from(outbox)).scalar_one())
