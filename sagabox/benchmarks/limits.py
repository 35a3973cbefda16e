"""The machine's limits, measured beside the sagas in the same run.

- database: pgbench running a custom script shaped like one saga transition (update
  a saga row, insert a history row, insert an outbox row, one commit) at the same
  concurrency; divided by sagabox's commits per saga, it bounds sagas/s from the
  database's side;
- broker: raw pika publishing with pipelined confirms (outbox_relay/bench.py's
  baseline); divided by the messages per saga, it bounds sagas/s from the broker's.
"""

from __future__ import annotations

import asyncio
import glob
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

import migrations
from outbox_relay import vhosts
from outbox_relay.bench import outbox_row, raw_baseline
from outbox_relay.relay import RelayConfig
from sagabox.benchmarks import store
from sagabox.benchmarks.errors import BenchError

ROWS = 10_000
# One saga transition: lock and update the saga row, append its history, emit a command.
TRANSITION = r"""\set n random(1, {rows})
BEGIN;
UPDATE sagabox.saga SET status = 'running', revision = revision + 1, updated_at = now(),
  state = state || jsonb_build_object('revision', revision + 1)
  WHERE id = md5(:n::text)::uuid RETURNING revision \gset
INSERT INTO sagabox.saga_history (saga_id, seq, at, event, step, attempt, message_id,
  from_status, to_status, event_data, emitted, actor)
  VALUES (md5(:n::text)::uuid, :revision, now(), 'replied', 'charge_payment', 1,
  gen_random_uuid(), 'running', 'running',
  '{{"kind": "reply", "ok": true, "result": {{"charge_id": "6f1c1d1e-5b5e-4c1e"}}}}',
  jsonb_build_array(gen_random_uuid()), 'orchestrator');
INSERT INTO sagabox.outbox (message_id, correlation_id, destination, body)
  VALUES (gen_random_uuid(), md5(:n::text)::uuid, 'shipping', repeat('x', 600));
COMMIT;
"""
PRELOAD = """
INSERT INTO sagabox.saga (id, name, version, status, state, revision)
SELECT md5(n::text)::uuid, 'place_order', 1, 'running',
       jsonb_build_object('data', jsonb_build_object('order_id', 'order-' || n,
         'customer', 'c001', 'sku', 'sku01', 'qty', 1, 'amount', 100, 'country', 'FR',
         'email', 'c001@example.com'), 'steps', '[]'::jsonb, 'revision', 1), 1
FROM generate_series(1, %s) AS n
"""


def pgbench_path() -> str | None:
    found = shutil.which("pgbench") or sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    if isinstance(found, list):
        return found[-1] if found else None
    return found


@dataclass(frozen=True)
class PgbenchResult:
    clients: int
    tps: float


def free_connections(admin_url: str) -> int:
    """How many more client connections the server takes now (max_connections less the
    reserved ones and every session open)."""
    with psycopg.connect(admin_url) as conn:
        row = conn.execute(FREE_CONNECTIONS).fetchone()
    return int(row[0]) if row else 0


FREE_CONNECTIONS = (
    "SELECT current_setting('max_connections')::int"
    " - current_setting('superuser_reserved_connections')::int"
    " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
)


def pgbench(admin_url: str, clients: int, seconds: float, database: str) -> PgbenchResult:
    """Transactions/s of one saga transition on a scratch database at ``clients``."""
    binary = pgbench_path()
    if binary is None:
        raise BenchError("pgbench not found (Debian: apt-get install postgresql-client)")
    store.recreate_database(admin_url, database)
    base = admin_url.rpartition("/")[0]
    url = f"{base}/{database}"
    try:
        migrations.upgrade(url, "orchestrator")
        with psycopg.connect(url) as conn:
            conn.execute(PRELOAD, [ROWS])
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "transition.sql"
            script.write_text(TRANSITION.format(rows=ROWS))
            parts = urlsplit(admin_url)
            argv = [
                binary, "-n", "-c", str(clients), "-j", str(min(clients, 2)),
                "-T", str(max(1, round(seconds))), "-f", str(script),
                "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432),
                "-U", parts.username or "postgres", database,
            ]  # fmt: skip
            done = subprocess.run(
                argv, check=False, capture_output=True, text=True, timeout=seconds + 60
            )
        match = re.search(r"tps = ([\d.]+) \(without initial", done.stdout)
        if done.returncode != 0 or match is None:
            raise BenchError(f"pgbench failed: {done.stderr.strip()[-500:]}")
        return PgbenchResult(clients, float(match.group(1)))
    finally:
        store.drop_database(admin_url, database)


def pika_rate(messages: int) -> float:
    """Messages/s of raw pika with pipelined confirms, on a scratch vhost."""
    rows = [outbox_row(i) for i in range(messages)]
    with vhosts.scratch("sagabox_bench") as amqp:
        config = RelayConfig(database_urls=(), amqp_url=amqp)
        seconds = asyncio.run(raw_baseline(amqp, config, rows))
    return messages / seconds
