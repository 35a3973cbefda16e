"""Every SQL statement of the benchmarks: commit counts, backends, saga statuses, sizes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import psycopg
from psycopg import sql


def commits(admin_url: str, databases: Iterable[str]) -> int:
    """xact_commit summed over ``databases``, as flushed so far by their backends."""
    return sum(commits_by_database(admin_url, databases).values())


def commits_by_database(admin_url: str, databases: Iterable[str]) -> dict[str, int]:
    """xact_commit of each of ``databases``, as flushed so far by their backends."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(
            "SELECT datname, xact_commit FROM pg_stat_database WHERE datname = ANY(%s)",
            [list(databases)],
        ).fetchall()
    return {str(r[0]): int(r[1]) for r in rows}


def backend_pids(admin_url: str, databases: Iterable[str]) -> list[int]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
            [list(databases)],
        ).fetchall()
    return [int(r[0]) for r in rows]


def recreate_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def statuses(url: str, saga_ids: Sequence[str]) -> dict[str, tuple[str, str, int]]:
    """saga id -> (name, status, version) for the given sagas."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT id::text, name, status, version FROM sagabox.saga WHERE id = ANY(%s::uuid[])",
            [list(saga_ids)],
        ).fetchall()
    return {str(r[0]): (str(r[1]), str(r[2]), int(r[3])) for r in rows}


def messages(url: str, saga_ids: Sequence[str]) -> int:
    """Messages these sagas sent, from their history: the commands the orchestrator
    emitted, the commands participants forwarded down a routing slip (one per result a
    reply's ``slip_results`` carries) and the replies it applied."""
    with psycopg.connect(url) as conn:
        row = conn.execute(_MESSAGES, [list(saga_ids)]).fetchone()
    return int(row[0]) if row else 0


_MESSAGES = """
SELECT coalesce(sum(CASE WHEN jsonb_typeof(emitted) = 'array'
                         THEN jsonb_array_length(emitted) ELSE 0 END), 0)
     + count(*) FILTER (WHERE event IN ('step_succeeded', 'step_failed', 'step_cancelled',
                                        'step_errored', 'compensation_succeeded',
                                        'compensation_failed'))
     + coalesce(sum((SELECT count(*) FROM jsonb_object_keys(event_data -> 'slip_results')))
                FILTER (WHERE jsonb_typeof(event_data -> 'slip_results') = 'object'), 0)
FROM sagabox.saga_history WHERE saga_id = ANY(%s::uuid[])
"""


# A finished place_order saga as the orchestrator leaves it: row, state and five
# history rows (started, four replies), dated a day ago; ids derived from the number.
PRELOAD_SAGAS = """
INSERT INTO sagabox.saga (id, name, version, status, state, revision, created_at, updated_at)
SELECT md5('preload-' || n)::uuid, 'place_order', 1, 'completed',
       jsonb_build_object(
         'data', jsonb_build_object('order_id', 'order-' || n, 'customer', 'c' || (n %% 64),
           'sku', 'sku' || (n %% 16), 'qty', 1, 'amount', 100, 'country', 'FR',
           'email', 'c' || (n %% 64) || '@example.com'),
         'status', 'completed', 'cursor', 4,
         'results', jsonb_build_object(
           'reserve_stock', jsonb_build_object('reservation_id', gen_random_uuid()),
           'charge_payment', jsonb_build_object('charge_id', gen_random_uuid()),
           'schedule_shipment', jsonb_build_object('shipment_id', gen_random_uuid()),
           'award_points', jsonb_build_object('points', 100)),
         'attempts', jsonb_build_object('reserve_stock', 1, 'charge_payment', 1,
           'schedule_shipment', 1, 'award_points', 1)),
       5, now() - interval '1 day', now() - interval '1 day'
FROM generate_series(%(first)s::int, %(last)s::int) AS n
"""
PRELOAD_HISTORY = """
INSERT INTO sagabox.saga_history (saga_id, seq, at, event, step, attempt, message_id,
  from_status, to_status, event_data, emitted, actor)
SELECT md5('preload-' || n)::uuid, k, now() - interval '1 day',
       CASE WHEN k = 1 THEN 'started' ELSE 'replied' END,
       (ARRAY[NULL, 'reserve_stock', 'charge_payment', 'schedule_shipment', 'award_points'])[k],
       CASE WHEN k = 1 THEN NULL ELSE 1 END,
       CASE WHEN k = 1 THEN NULL ELSE gen_random_uuid() END,
       CASE WHEN k = 1 THEN NULL ELSE 'running' END,
       CASE WHEN k = 5 THEN 'completed' ELSE 'running' END,
       jsonb_build_object('kind', 'reply', 'ok', true),
       CASE WHEN k = 5 THEN NULL ELSE jsonb_build_array(gen_random_uuid()) END,
       'orchestrator'
FROM generate_series(%(first)s::int, %(last)s::int) AS n, generate_series(1, 5) AS k
"""
TABLES = ("sagabox.saga", "sagabox.saga_history", "sagabox.outbox", "sagabox.reply_inbox")


def preload(url: str, count: int, chunk: int = 100_000) -> None:
    """Insert ``count`` finished sagas with their history, ``chunk`` per transaction."""
    with psycopg.connect(url) as conn:
        for first in range(1, count + 1, chunk):
            bounds = {"first": first, "last": min(count, first + chunk - 1)}
            conn.execute(PRELOAD_SAGAS, bounds)
            conn.execute(PRELOAD_HISTORY, bounds)
            conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE sagabox.saga, sagabox.saga_history")


def row_counts(url: str) -> dict[str, int]:
    """Rows in the saga and history tables."""
    with psycopg.connect(url) as conn:
        return {
            table: int(row[0])
            for table in TABLES[:2]
            if (row := conn.execute(f"SELECT count(*) FROM {table}").fetchone())
        }


def table_sizes(url: str) -> dict[str, int]:
    """Bytes of each orchestrator table, indexes and TOAST included."""
    with psycopg.connect(url) as conn:
        return {
            table: int(row[0])
            for table in TABLES
            if (row := conn.execute("SELECT pg_total_relation_size(%s)", [table]).fetchone())
        }
