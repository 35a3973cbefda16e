"""Every SQL statement the relay (and its benchmark) runs against an outbox.

The relay claims rows with ``FOR UPDATE SKIP LOCKED`` inside a short
transaction, so several relays can share one outbox; it never keeps a "last
published id" cursor, because rows commit out of id order.

A batch costs two round trips: ``BEGIN; EXECUTE claim`` and ``EXECUTE delete;
COMMIT``, each one simple-protocol query running statements prepared once per
connection with SQL ``PREPARE``. psycopg would send BEGIN and COMMIT as round trips of
their own (four per batch), and on this kind of machine a round trip costs more CPU
than the statements it carries (measured: 1.05 against 2.0 ms of the relay's CPU per
one-row batch, on a loaded 2-core VM). Only integers are spliced into these queries.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, Connection

from outbox_relay.table import NOTIFY_CHANNEL

AsyncConn = AsyncConnection[Any]

# Settings of the relay's claiming sessions. The outbox swings between empty and
# huge faster than ANALYZE follows, so the planner's row estimates are stale and
# it would sort the whole table (70-100 ms for 30,000 rows) where walking the
# primary key in order and stopping at LIMIT takes 3 ms; and JIT-compiling the
# claim costs more than running it. Every statement on these sessions reads rows
# by id, so no sequential scan is wanted; and none needs a plan for its parameters'
# values, while PostgreSQL's default would plan the delete (id = ANY($1)) at every
# run, its generic plan's guess at the array's length making that plan look dearer.
SESSION_OPTIONS = "-c enable_seqscan=off -c jit=off -c plan_cache_mode=force_generic_plan"


@dataclass(frozen=True, slots=True)
class Backlog:
    """Unpublished rows, the age of the oldest one in seconds, and parked rows."""

    pending: int
    oldest_age: float
    parked: int


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A claimed outbox row: what to publish, and where."""

    id: int
    message_id: str
    correlation_id: str | None
    exchange: str
    destination: str
    body: str
    headers: dict[str, Any] | None
    attempts: int


# A row is claimable when it is neither parked nor backing off, and no earlier row
# of its correlation id still exists: rows are deleted only once confirmed, so a
# later row can never overtake an earlier one, whichever relay holds it. The
# index (correlation_id, id) answers the NOT EXISTS.
CLAIM = """
SELECT o.id, o.message_id::text, o.correlation_id::text, o.exchange, o.destination,
       o.body, o.headers, o.attempts
FROM sagabox.outbox o
WHERE o.parked_at IS NULL
  AND (o.available_at IS NULL OR o.available_at <= now())
  AND (o.correlation_id IS NULL OR NOT EXISTS (
        SELECT 1 FROM sagabox.outbox e
        WHERE e.correlation_id = o.correlation_id AND e.id < o.id))
ORDER BY o.id
LIMIT %s
FOR UPDATE OF o SKIP LOCKED
"""

DELETE = "DELETE FROM sagabox.outbox WHERE id = ANY($1)"

# Whether a claim could find something, leaving out the rows this relay holds: one
# autocommit round trip, where a claim that finds nothing costs two (BEGIN; claim,
# then COMMIT). Looser than CLAIM (it ignores the order of a correlation id's rows):
# it may send the relay to a claim that finds nothing, never keep it from one.
# A row, not EXISTS: PostgreSQL drops the ORDER BY of an EXISTS subquery, and with no
# order to keep nor index condition it scans the heap from its first page, through
# every row deleted since the last vacuum (0.2 to 0.45 ms a poll under load); walking
# the primary key skips them once each was seen dead.
CLAIMABLE = """
SELECT o.id FROM sagabox.outbox o
WHERE o.parked_at IS NULL
  AND (o.available_at IS NULL OR o.available_at <= now())
  AND o.id <> ALL($1)
ORDER BY o.id
LIMIT 1
"""

# Prepared once per claiming connection (SQL-level, so a simple query can run them).
PREPARE = (
    f"PREPARE sagabox_claim(int) AS {CLAIM.replace('LIMIT %s', 'LIMIT $1')};"
    f"PREPARE sagabox_delete(bigint[]) AS {DELETE};"
    f"PREPARE sagabox_claimable(bigint[]) AS {CLAIMABLE}"
)

# Backoff doubles per attempt: base * 2^attempts, capped.
RETRY = """
UPDATE sagabox.outbox
SET attempts = attempts + 1,
    available_at = now() + least(%(base)s * power(2, least(attempts, 30)), %(cap)s)
                           * interval '1 second',
    error = %(error)s
WHERE id = ANY(%(ids)s)
"""

PARK = """
UPDATE sagabox.outbox AS o
SET parked_at = now(), error = p.error
FROM unnest(%s::bigint[], %s::text[]) AS p(id, error)
WHERE o.id = p.id
"""

LISTEN = f"LISTEN {NOTIFY_CHANNEL}"

# One relay at a time leads a database (RelayConfig.exclusive): a session-level
# advisory lock, so a leader's death (its connection closing) frees it at once. The
# key is a hash of a fixed text, scoped by PostgreSQL to the current database.
LEADER_KEY = "hashtextextended('sagabox.outbox relay', 0)"
LEAD = f"SELECT pg_try_advisory_lock({LEADER_KEY})"
# A lock only says the leader's session is open, not that its loop runs (a frozen
# process keeps its sockets). Every session of a relay carries its application_name;
# the leader runs a statement at least once a second (a claim, or BEAT), so the time
# since the last statement of any session named as the lock holder's is how long the
# leader has been silent (NULL: nobody holds the lock). Polled by standbys rather than
# heard through LISTEN: a listening session costs PostgreSQL a transaction per NOTIFY
# of the whole database, whatever the channel.
BEAT = "SELECT 1"
LEADER_SILENCE = f"""
SELECT extract(epoch FROM now() - max(a.query_start))
FROM pg_stat_activity AS a
WHERE a.datname = current_database()
  AND a.application_name = (
    SELECT h.application_name
    FROM pg_locks AS l JOIN pg_stat_activity AS h ON h.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND (l.classid::bigint << 32 | l.objid::bigint)
          = {LEADER_KEY}
    LIMIT 1)
"""

PROBE = "SELECT 1 FROM sagabox.outbox LIMIT 1"

# For the metrics: one pass over the (usually small) table.
BACKLOG = """
SELECT count(*) FILTER (WHERE parked_at IS NULL),
       coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE parked_at IS NULL)), 0),
       count(*) FILTER (WHERE parked_at IS NOT NULL)
FROM sagabox.outbox
"""

INSERT_MANY = """
INSERT INTO sagabox.outbox (message_id, correlation_id, destination, body)
SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::text[])
"""


async def prepare(conn: AsyncConn) -> None:
    """Get an autocommit connection ready for claim() and delete_and_commit()."""
    await conn.execute(PREPARE)


async def claim(conn: AsyncConn, limit: int) -> list[OutboxRow]:
    """Open a transaction, lock and return up to ``limit`` publishable rows in id order.

    The transaction stays open (rows locked) until delete_and_commit() or commit().
    """
    cur = conn.cursor()
    await cur.execute(f"BEGIN; EXECUTE sagabox_claim({int(limit)})")
    cur.nextset()  # past BEGIN's empty result
    return [OutboxRow(*row) for row in await cur.fetchall()]


async def claimable(conn: AsyncConn, held: Collection[int]) -> bool:
    """Whether rows other than ``held`` might be claimed now (see CLAIMABLE); no
    transaction is left open."""
    array = ",".join(str(int(i)) for i in held)
    # SQL-prepared already: psycopg preparing the EXECUTE again would add nothing.
    cur = await conn.execute(f"EXECUTE sagabox_claimable('{{{array}}}')", prepare=False)
    return await cur.fetchone() is not None


async def delete_and_commit(conn: AsyncConn, ids: Sequence[int]) -> None:
    """Remove published rows (RabbitMQ confirmed them) and end the claim's transaction."""
    if ids:
        array = ",".join(str(int(i)) for i in ids)
        await conn.execute(f"EXECUTE sagabox_delete('{{{array}}}'); COMMIT")
    else:
        await commit(conn)


async def commit(conn: AsyncConn) -> None:
    """End the claim's transaction (an empty claim, or nothing confirmed)."""
    await conn.execute("COMMIT")


async def retry_later(
    conn: AsyncConn, ids: Sequence[int], error: str, *, base: float, cap: float
) -> None:
    """Count a failed attempt and hide the rows until their backoff has passed."""
    if ids:
        await conn.execute(RETRY, {"ids": list(ids), "base": base, "cap": cap, "error": error})


async def park(conn: AsyncConn, errors: Sequence[tuple[int, str]]) -> None:
    """Set rows aside for an operator: they are kept, with the reason, never published."""
    if errors:
        await conn.execute(PARK, ([i for i, _ in errors], [e for _, e in errors]))


async def listen(conn: AsyncConn, *, listening: bool = True) -> None:
    """Subscribe an autocommit connection to the writers' NOTIFY channel (or stop)."""
    await conn.execute(LISTEN if listening else f"UNLISTEN {NOTIFY_CHANNEL}")


# How often a LISTEN session that only receives notifications runs a statement (below).
LISTEN_CHECK_INTERVAL = 1.0


async def check_listening(conn: AsyncConn) -> None:
    """A statement on a LISTEN session, about once a second.

    PostgreSQL (15 and later) reads each notification in a transaction of the listening
    session, and a session reports its statistics only when it goes idle after a
    statement: one that only listens keeps its commits out of ``pg_stat_database``
    until it disconnects (a relay's ran to about one per saga message). And a session
    that never sends cannot learn that its server lost the connection: the statement
    is answered by a reset (or times out), and the listener reconnects and catches up.
    psycopg (3.2.4 and later) keeps the notifications that arrive meanwhile.
    """
    await conn.execute(BEAT)


async def lead(conn: AsyncConn) -> bool:
    """Take this database's relay leadership for the session of ``conn``, if free."""
    cur = await conn.execute(LEAD)
    row = await cur.fetchone()
    return bool(row and row[0])


async def beat(conn: AsyncConn) -> None:
    """A statement, so that standbys see this leader's loop run (autocommit)."""
    await conn.execute(BEAT)


async def leader_silence(conn: AsyncConn) -> float | None:
    """Seconds since the leader's sessions last ran a statement; None: no leader."""
    cur = await conn.execute(LEADER_SILENCE)
    row = await cur.fetchone()
    return None if row is None or row[0] is None else float(row[0])


async def probe(conn: AsyncConn) -> None:
    """Fail unless the outbox table is there and readable."""
    await conn.execute(PROBE)


async def backlog(conn: AsyncConn) -> Backlog:
    """How far behind the relays are on this outbox."""
    cur = await conn.execute(BACKLOG)
    row = await cur.fetchone()
    assert row is not None  # an aggregate always returns a row
    return Backlog(int(row[0]), float(row[1]), int(row[2]))


def insert_many(conn: Connection[Any], rows: Sequence[tuple[str, str | None, str, str]]) -> None:
    """Bulk-insert (message_id, correlation_id, destination, body) rows (benchmark prefill)."""
    conn.execute(INSERT_MANY, tuple([row[i] for row in rows] for i in range(4)))
