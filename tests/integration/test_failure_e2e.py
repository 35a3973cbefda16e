"""A failure path across real processes: the inventory worker is down, so the step
times out and is retried by the orchestrator process's timer sweeper; once the
worker starts, it works through the queued attempts (its inbox makes them one
reservation) and the saga completes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from orchestrator import Orchestrator, Registry, Retry, Saga, SagaView, Step, data, make_engine
from participants.examples import inventory
from sagabox.supervisor import ProcessSpec, Supervisor, sagabox_argv
from tests.servers import ROOT

pytestmark = pytest.mark.integration

RESERVE = Saga(
    "reserve_only",
    version=1,
    input={"sku": str, "qty": int},
    steps=[
        Step(
            "reserve",
            participant="inventory",
            command="reserve_stock",
            compensation="release_stock",
            payload={"sku": data("sku"), "qty": data("qty")},
            result=("reservation_id",),
            # Short, so that the test sees several attempts time out in a few seconds.
            timeout=1.0,
            retry=Retry(max_attempts=None, initial=0.3, maximum=0.5),
        )
    ],
)


def registry() -> Registry:
    """For the orchestrator process (SAGABOX_SAGAS=tests.integration.test_failure_e2e:registry)."""
    return Registry([RESERVE])


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url, pool_size=2)
    yield eng
    eng.dispose()


def wait_for(
    orch: Orchestrator, saga_id: str, done: Callable[[SagaView], bool], timeout: float
) -> SagaView:
    deadline = time.monotonic() + timeout
    while True:
        view = orch.get(saga_id)
        if done(view) or time.monotonic() > deadline:
            return view
        time.sleep(0.1)


def test_a_step_times_out_while_its_worker_is_down_and_completes_once_it_runs(
    engine: Engine, db_url: str, amqp_url: str, tmp_path: Path
) -> None:
    with Session(engine) as session, session.begin():
        inventory.add_stock(session, "apple", 10)
    env = {
        "SAGABOX_AMQP_URL": amqp_url,
        "SAGABOX_DATABASE_URL": db_url,
        "SAGABOX_RELAY_DATABASE_URLS": db_url,
        "SAGABOX_PARTICIPANT_DATABASE_URL": db_url,
        "SAGABOX_SAGAS": "tests.integration.test_failure_e2e:registry",
        "SAGABOX_TIMER_INTERVAL": "0.1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    orch = Orchestrator(engine, registry())
    with Supervisor(tmp_path / "logs") as supervisor:
        supervisor.start(ProcessSpec("relay", sagabox_argv("relay"), env))
        supervisor.start(ProcessSpec("orchestrator", sagabox_argv("orchestrator"), env))
        saga_id = orch.start("reserve_only", {"sku": "apple", "qty": 3})

        view = wait_for(orch, saga_id, lambda v: v.state.steps["reserve"].attempt >= 3, 30)
        assert view.row.status == "running", supervisor.dead()
        assert view.state.steps["reserve"].attempt >= 3, "the sweeper did not retry"
        timeouts = [h["reason"] for h in view.history if h["event"] == "timers_due"]
        assert any("no reply within 1s (attempt 1)" in (r or "") for r in timeouts)

        worker = sagabox_argv("participant", "participants.examples.inventory", "--threads", "2")
        supervisor.start(ProcessSpec("inventory", worker, env))
        view = wait_for(orch, saga_id, lambda v: v.row.status != "running", 45)
        assert not supervisor.dead(), supervisor.dead()
    assert view.row.status == "completed", view.history
    assert view.state.steps["reserve"].result is not None
    with engine.connect() as conn:
        stock = conn.execute(select(inventory.stock.c.available)).scalar_one()
        reservations = conn.execute(
            select(func.count()).select_from(inventory.reservations)
        ).scalar_one()
    assert (stock, reservations) == (7, 1), "every attempt, one reservation"
