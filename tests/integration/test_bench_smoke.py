"""``sagabox bench saga`` on 20 sagas without peers: sane figures, and the check holds."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import psycopg
import pytest

from sagabox.benchmarks.report import render, to_json
from sagabox.benchmarks.run import Options, Report, database_limit, run
from tests import servers

PROCESSES = ("relay", "orchestrator", "inventory", "payment", "shipping", "loyalty")

pytestmark = pytest.mark.integration


def small(**overrides: Any) -> Options:
    """20 sagas at concurrency 4, no peers, on databases of this test's own."""
    options: dict[str, Any] = {
        "count": 20,
        "concurrency": 4,
        "warmup": 2,
        "peers": (),
        "admin_url": servers.PG_ADMIN_URL,
        "settle": 1.0,
        "prefix": f"sagabox_test_bench_{uuid.uuid4().hex[:8]}",
    }
    return Options(**(options | overrides))


# Messages per saga: v1 sends 4 commands and gets 4 replies (6 in all when the payment
# is declined); on the routing slip (v3) every saga sends 5: 4 commands and 1 reply, or
# reserve, charge, the refusal, release and its reply.
MESSAGES = {1: 7.8, 3: 5.0}


@pytest.mark.parametrize("version", [1, 3])
def test_the_saga_benchmark_measures_sagabox_and_its_consistency_holds(
    services: None, version: int
) -> None:
    report = run(small(version=version), say=lambda _: None)
    text = render(report)
    (sagabox,) = report.systems
    main = sagabox.main
    assert report.ok, text
    assert main.run.count == 20 and len(main.run.latencies_ms) == 20, text
    assert 0 < main.run.rate < 10_000, text
    p50, p99 = main.run.percentile(0.5), main.run.percentile(0.99)
    assert 0 < p50 <= p99 < 60_000, text
    # A 4-step saga commits at least once per step and its start; polling adds more.
    assert 5 <= main.per_saga(main.commits) < 1_000, text
    assert main.messages == pytest.approx(20 * MESSAGES[version], rel=0.2), text
    assert f"place_order v{version}" in sagabox.config, text
    mine = {k: v for k, v in main.cpu_seconds.items() if k not in ("postgres", "rabbitmq")}
    # The client (this process: it starts the sagas and waits) counts, as a peer's does.
    assert set(mine) == {"client", *PROCESSES}
    assert _all_busy(mine) and main.cpu_seconds["postgres"] > 0, text
    assert all(not math.isnan(v) for v in main.cpu_seconds.values()), text
    line = next(row for row in text.splitlines() if row.startswith("sagabox "))
    assert line.endswith("ok"), text
    # The machine's speed, measured before and after on the same PostgreSQL.
    assert len(report.machine) == 2, text
    for speed in report.machine:
        assert 0 < speed.python_us < 10_000 and 0 < speed.roundtrip_us < 1_000_000, text
        # Both sides of a round trip spend CPU (a clock tick is 10 ms: over 3,000 of
        # them, never zero).
        assert 0 < speed.roundtrip_cpu_us < speed.roundtrip_us * 10, text
    assert text.splitlines()[-1].startswith("machine: a fixed Python workload "), text
    # --json: the same figures, strict JSON.
    (round_,) = json.loads(json.dumps(to_json([report]), allow_nan=False))["rounds"]
    (written,) = round_["systems"]
    assert written["main"]["run"]["latencies_ms"] == main.run.latencies_ms
    assert written["summary"]["sagas_per_second"] == pytest.approx(main.run.rate)
    assert written["summary"]["cpu_ms_per_saga"]["by_process"].keys() == mine.keys()
    assert [m["roundtrip_us"] for m in round_["machine"]] == [
        m.roundtrip_us for m in report.machine
    ]


def test_with_two_replicas_of_each_process_the_check_still_holds(services: None) -> None:
    report = run(small(replicas=(1, 2)), say=lambda _: None)
    text = render(report)
    one, two = report.systems
    assert report.ok, text
    assert (one.name, one.replicas, two.name, two.replicas) == ("sagabox", 1, "sagabox x2", 2)
    assert two.main.run.count == 20 and not two.problems, text
    assert two.main.messages == pytest.approx(20 * MESSAGES[3], rel=0.2), text
    # Every replica's CPU counts, in its component's group.
    mine = {k: v for k, v in two.main.cpu_seconds.items() if k not in ("postgres", "rabbitmq")}
    assert set(mine) == {"client", *PROCESSES}
    assert _all_busy(mine), text
    assert "2 relays + 2 orchestrators + 2 x 4 workers" in two.config
    rows = text.splitlines()
    table = rows.index(
        "replicas: N orchestrators, N relays and N workers per service, same closed loop"
    )
    assert rows[table + 2].split()[-3:] == ["ok", "1.00x", "1.00x"], text
    assert rows[table + 3].split()[:1] == ["2"] and "ok" in rows[table + 3].split(), text


def test_pgbench_runs_at_each_concurrency_the_server_takes_and_skips_the_rest(
    services: None,
) -> None:
    # A sweep past max_connections (100 by default) once ended the whole run.
    # Past max_connections itself: tests on other workers open and close sessions.
    with psycopg.connect(servers.PG_ADMIN_URL) as conn:
        row = conn.execute("SELECT current_setting('max_connections')::int").fetchone()
    assert row is not None
    too_many = row[0] + 10
    options = small(pgbench_seconds=1.0, sweep=(too_many,))
    report = Report(options)
    database_limit(options, report, say=lambda _: None)
    assert list(report.pgbench) == [4] and report.pgbench[4] > 0, report.pgbench
    assert any(f"pgbench at {too_many} clients skipped" in n for n in report.notes), report.notes


def _all_busy(cpu_seconds: dict[str, float]) -> bool:
    """Every process but the relay spent CPU. With every message published directly,
    the relay of a 20-saga run may spend less than a clock tick (10 ms): zero, measured."""
    return all(v > 0 for k, v in cpu_seconds.items() if k != "relay") and all(
        v >= 0 for v in cpu_seconds.values()
    )
