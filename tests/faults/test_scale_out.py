"""Scale-out under SIGKILL: two orchestrators, two relays and two workers of each order
service run a steady load of place_order sagas under ``sagabox up``'s supervisor; one
of each is killed mid-load and restarted. Every saga still ends as it should, no effect
is applied twice, and each saga's history is one contiguous sequence."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from orchestrator import Orchestrator, make_engine
from orchestrator import store as orchestrator_store
from orchestrator.tables import saga
from outbox_relay.table import outbox
from participants.examples.checks import SagaOutcome, Seed, check, seed
from participants.examples.sagas import registry
from sagabox.settings.participant import DEFAULT_PUBLISH_LEASE
from sagabox.supervisor import RestartPolicy
from sagabox.up import Replicas, Up, UpConfig
from tests import servers

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SERVICES = ("inventory", "payment", "shipping", "loyalty")
SEED = Seed(stock={"apple": 100_000}, balances={"alice": 100_000_000, "bob": 50})
LOAD_SECONDS = 14.0
RATE = 8  # sagas started per second
KILL_AFTER = 5.0
TERMINAL = ("completed", "compensated")


def order(i: int) -> tuple[dict[str, Any], str]:
    """The i-th order and the outcome it must reach: mostly completed, some compensated."""
    customer, amount, country, expect = "alice", 300, "FR", "completed"
    if i % 7 == 3:
        customer, amount, expect = "bob", 900, "compensated"  # payment declined
    elif i % 11 == 5:
        country, expect = "US", "compensated"  # no shipping there: refund, release
    data = {
        "order_id": f"order-{i}",
        "customer": customer,
        "sku": "apple",
        "qty": 1,
        "amount": amount,
        "country": country,
        "email": f"{customer}@example.com",
    }
    return data, expect


@pytest.fixture
def databases(template_db: str) -> Iterator[dict[str, str]]:
    with contextlib.ExitStack() as stack:
        yield {
            name: stack.enter_context(servers.database_from(template_db, "sagabox_scale"))
            for name in ("orchestrator", *SERVICES)
        }


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def outcomes(engine: Engine) -> dict[str, SagaOutcome]:
    with engine.connect() as conn:
        rows = conn.execute(select(saga.c.id, saga.c.name, saga.c.version, saga.c.status))
        return {str(r.id): SagaOutcome(r.name, r.version, r.status) for r in rows}


def completed(engine: Engine) -> int:
    with engine.connect() as conn:
        query = select(func.count()).select_from(saga).where(saga.c.status == "completed")
        return int(conn.execute(query).scalar_one())


def outbox_left(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outbox)).scalar_one())


def history_gaps(engine: Engine) -> list[str]:
    """Sagas whose history seq is not 1..n with no gap and no repeat."""
    with engine.connect() as conn:
        return orchestrator_store.history_gaps(conn)


def test_killed_replicas_are_restarted_and_every_saga_ends_consistently(
    databases: dict[str, str], amqp_url: str, tmp_path: Path
) -> None:
    engines = {name: make_engine(url, pool_size=2) for name, url in databases.items()}
    engines["accounting"] = engines["orchestrator"]  # no fares here: its check sees none
    seed(engines, SEED)
    config = UpConfig(
        orchestrator_url=databases["orchestrator"],
        participant_urls={s: databases[s] for s in SERVICES},
        amqp_url=amqp_url,
        replicas=Replicas(orchestrator=2, relay=2, participants=2),
        threads=2,
    )
    lines: list[str] = []
    up = Up(config, tmp_path / "logs", RestartPolicy(initial=0.3), say=lines.append)
    stop = threading.Event()
    watcher = threading.Thread(target=up.watch, args=(stop,), daemon=True)
    orchestrator = Orchestrator(engines["orchestrator"], registry())
    expected: dict[str, str] = {}
    victims = ["orchestrator-1", "relay-1", *(f"{s}-1" for s in SERVICES)]
    try:
        up.start()
        watcher.start()
        started, killed = time.monotonic(), False
        i = 0
        # Load goes on past LOAD_SECONDS until the kill happened (a slow machine may
        # take longer to complete its first sagas), but not forever.
        while (elapsed := time.monotonic() - started) < LOAD_SECONDS or (
            not killed and elapsed < LOAD_SECONDS + 60
        ):
            data, expect = order(i)
            expected[orchestrator.start("place_order", data, version=1, idempotency_key=str(i))] = (
                expect
            )
            i += 1
            if not killed and elapsed >= KILL_AFTER and completed(engines["orchestrator"]) >= 5:
                for name in victims:
                    os.kill(up.supervisor.pid(name), signal.SIGKILL)
                killed = True
            time.sleep(max(0.0, started + i / RATE - time.monotonic()))
        assert killed, "fewer than 5 sagas completed in time: the replicas were never killed"
        wait_for(
            lambda: all(up.supervisor.restarts.get(n, 0) >= 1 for n in victims),
            # Generous: the supervisor's restart backoff stretches on a loaded machine.
            60,
            "the killed processes to be restarted",
        )

        def settled() -> bool:
            statuses = outcomes(engines["orchestrator"])
            return all(statuses[s].status in TERMINAL for s in expected)

        wait_for(settled, 90, "every saga to end")
        # While they run: a row a killed replica published itself but never saw
        # confirmed waits out its lease before a relay publishes it again.
        wait_for(
            lambda: all(outbox_left(e) == 0 for e in engines.values()),
            DEFAULT_PUBLISH_LEASE + 20,
            "every outbox to drain",
        )
        assert up.supervisor.dead() == {}, "\n".join(lines)
    finally:
        stop.set()
        watcher.join(timeout=5)
        codes = up.stop()
    try:
        final = outcomes(engines["orchestrator"])
        wrong = {s: (final[s].status, e) for s, e in expected.items() if final[s].status != e}
        assert not wrong, f"{len(wrong)} sagas ended otherwise than expected: {wrong}"
        assert check(engines, SEED, final) == []
        assert history_gaps(engines["orchestrator"]) == []
        for name, engine in engines.items():
            left = outbox_left(engine)
            assert left == 0, f"{name}: {left} outbox rows never published"
        assert len(expected) >= LOAD_SECONDS * RATE * 0.8
        assert all(f"restarted {n}" in "\n".join(lines) for n in victims)
        # SIGTERM stopped every process in time (none needed SIGKILL: that is -9).
        assert all(code is not None and code != -signal.SIGKILL for code in codes.values()), codes
    finally:
        for engine in {id(e): e for e in engines.values()}.values():
            engine.dispose()
