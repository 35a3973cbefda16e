"""Operator actions on real PostgreSQL: retry, skip, abort, resume, and their refusals.

Each action is one transaction: the saga row, one history row carrying the actor and
the reason, and the commands it emits in the outbox. A refused action writes nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from orchestrator import (
    OperatorActionError,
    Orchestrator,
    Parallel,
    Registry,
    Retry,
    Saga,
    SagaStatus,
    Step,
    StepStatus,
    UnknownSagaError,
)
from orchestrator.machine import command_id
from orchestrator.tables import history, saga
from outbox_relay.message import Envelope, decode
from outbox_relay.table import outbox
from sagabox.cli import main
from tests.support import Clock

pytestmark = pytest.mark.integration

# a (parks when it gives up; its compensation parks after 2 attempts) -> b -> pivot
# -> x and y in parallel (both park when they give up, as steps after a pivot must).
OPS = Saga(
    "ops",
    version=1,
    input={"n": int},
    steps=[
        Step(
            "a",
            "pa",
            "do_a",
            compensation="undo_a",
            result=("id",),
            retry=Retry(max_attempts=1, on_exhausted="park"),
            compensation_retry=Retry(max_attempts=2, initial=1.0, jitter=0, on_exhausted="park"),
            timeout=10,
        ),
        Step("b", "pb", "do_b", compensation="undo_b", timeout=10),
        Step("pivot", "pc", "do_pivot", pivot=True, timeout=10),
        Parallel(
            Step(
                "x",
                "px",
                "do_x",
                result=("tracking",),
                retry=Retry(max_attempts=2, initial=1.0, jitter=0, on_exhausted="park"),
                timeout=10,
            ),
            Step("y", "py", "do_y", retry=Retry(max_attempts=None, on_exhausted="park")),
        ),
    ],
)


def registry() -> Registry:
    """For the CLI (SAGABOX_SAGAS=tests.integration.test_operator:registry)."""
    return Registry([OPS])


@pytest.fixture
def orch(engine: Engine, clock: Clock) -> Orchestrator:
    return Orchestrator(engine, registry(), clock=clock)


def answer(saga_id: str, step: str, type_: str, attempt: int = 1, **payload: Any) -> Envelope:
    kind = "compensation" if type_ in ("compensated", "compensation_failed") else "command"
    return Envelope(
        message_id=str(uuid.uuid4()),
        correlation_id=saga_id,
        causation_id=command_id(saga_id, step, kind, attempt),
        saga="ops",
        version=1,
        step=step,
        attempt=attempt,
        kind="reply",
        type=type_,
        payload=payload,
    )


def apply(
    orch: Orchestrator, saga_id: str, step: str, type_: str, attempt: int = 1, **p: Any
) -> None:
    [outcome] = orch.handle_replies([answer(saga_id, step, type_, attempt, **p)])
    assert outcome.status == "applied", outcome


def sent(engine: Engine) -> list[tuple[str, str, int]]:
    """(type, step, attempt) of every command in the outbox, oldest first."""
    with engine.connect() as conn:
        bodies = conn.execute(select(outbox.c.body).order_by(outbox.c.id)).scalars()
        return [(e.type, e.step, e.attempt) for e in map(decode, bodies)]


def snapshot(orch: Orchestrator, engine: Engine, saga_id: str) -> tuple[Any, ...]:
    view = orch.get(saga_id)
    return view.row, view.history, sent(engine)


def parked_after_pivot(orch: Orchestrator) -> str:
    """x is refused after the pivot: parked, with y still in flight."""
    saga_id = orch.start("ops", {"n": 1})
    apply(orch, saga_id, "a", "succeeded", result={"id": "a-1"})
    apply(orch, saga_id, "b", "succeeded")
    apply(orch, saga_id, "pivot", "succeeded")
    apply(orch, saga_id, "x", "failed", reason="address unknown")
    state = orch.get(saga_id).state
    assert (state.status, state.parked_step) == (SagaStatus.FAILED, "x")
    return saga_id


def parked_in_compensation(orch: Orchestrator, clock: Clock) -> str:
    """b is refused; undo_a fails twice: parked while compensating."""
    saga_id = orch.start("ops", {"n": 1})
    apply(orch, saga_id, "a", "succeeded", result={"id": "a-1"})
    apply(orch, saga_id, "b", "failed", reason="no")
    apply(orch, saga_id, "a", "compensation_failed", 1, reason="db down")
    clock.now += 1
    assert orch.fire_timers() == 1
    apply(orch, saga_id, "a", "compensation_failed", 2, reason="db down")
    state = orch.get(saga_id).state
    assert (state.status, state.parked_step) == (SagaStatus.FAILED, "a")
    assert state.steps["a"].status is StepStatus.COMPENSATION_FAILED
    return saga_id


def parked_before_pivot(orch: Orchestrator) -> str:
    """a errors and, with one attempt and on_exhausted='park', parks the saga."""
    saga_id = orch.start("ops", {"n": 1})
    apply(orch, saga_id, "a", "error", reason="timeout upstream")
    state = orch.get(saga_id).state
    assert (state.status, state.parked_step) == (SagaStatus.FAILED, "a")
    assert state.steps["a"].status is StepStatus.ABANDONED
    return saga_id


def last_history(orch: Orchestrator, saga_id: str) -> dict[str, Any]:
    return orch.get(saga_id).history[-1]


def test_retry_a_parked_step_sends_a_new_attempt_and_the_saga_completes(
    orch: Orchestrator, engine: Engine
) -> None:
    saga_id = parked_after_pivot(orch)
    before = len(sent(engine))
    state = orch.retry_step(saga_id, "x", actor="alice", reason="address fixed")
    assert state.status is SagaStatus.RUNNING and state.parked_step is None
    # y lost its timer when the saga parked: it is sent again too.
    assert sent(engine)[before:] == [("do_x", "x", 2), ("do_y", "y", 2)]
    h = last_history(orch, saga_id)
    assert (h["event"], h["step"], h["actor"], h["to_status"]) == (
        "step_retried",
        "x",
        "alice",
        "running",
    )
    assert "address fixed" in h["reason"]
    assert h["event_data"]["reason"] == "address fixed"
    apply(orch, saga_id, "x", "succeeded", 2, result={"tracking": "t-1"})
    apply(orch, saga_id, "y", "succeeded", 1)  # the old attempt's answer still decides y
    assert orch.get(saga_id).row.status == "completed"
    assert orch.replay(saga_id) == orch.get(saga_id).state


def test_retry_a_parked_compensation(orch: Orchestrator, engine: Engine, clock: Clock) -> None:
    saga_id = parked_in_compensation(orch, clock)
    state = orch.retry_step(saga_id, "a", actor="bob", reason="db is back")
    assert state.status is SagaStatus.COMPENSATING
    assert sent(engine)[-1] == ("undo_a", "a", 3)
    apply(orch, saga_id, "a", "compensated", 3)
    view = orch.get(saga_id)
    assert view.row.status == "compensated"
    assert orch.replay(saga_id) == view.state


def test_skip_a_forward_step_needs_its_declared_result(orch: Orchestrator, engine: Engine) -> None:
    saga_id = parked_after_pivot(orch)
    before = snapshot(orch, engine, saga_id)
    with pytest.raises(OperatorActionError, match=r"lacks declared field\(s\) \['tracking'\]"):
        orch.skip_step(saga_id, "x", actor="alice", reason="shipped by hand")
    with pytest.raises(OperatorActionError, match="not JSON"):
        orch.skip_step(saga_id, "x", actor="alice", reason="r", result={"tracking": object()})
    assert snapshot(orch, engine, saga_id) == before

    state = orch.skip_step(
        saga_id, "x", actor="alice", reason="shipped by hand", result={"tracking": "manual-7"}
    )
    assert state.status is SagaStatus.RUNNING
    assert state.steps["x"].status is StepStatus.SUCCEEDED
    assert state.steps["x"].result == {"tracking": "manual-7"}
    assert sent(engine)[-1] == ("do_y", "y", 2)
    assert last_history(orch, saga_id)["event_data"]["result"] == {"tracking": "manual-7"}
    apply(orch, saga_id, "y", "succeeded", 2)
    assert orch.get(saga_id).row.status == "completed"
    assert orch.replay(saga_id) == orch.get(saga_id).state


def test_skip_a_parked_compensation_and_the_saga_ends_compensated(
    orch: Orchestrator, engine: Engine, clock: Clock
) -> None:
    saga_id = parked_in_compensation(orch, clock)
    before = len(sent(engine))
    state = orch.skip_step(saga_id, "a", actor="carol", reason="released by hand")
    assert state.status is SagaStatus.COMPENSATED
    assert state.steps["a"].status is StepStatus.COMPENSATED
    assert len(sent(engine)) == before
    assert last_history(orch, saga_id)["actor"] == "carol"


def test_abort_a_running_saga_compensates_what_succeeded(
    orch: Orchestrator, engine: Engine
) -> None:
    saga_id = orch.start("ops", {"n": 1})
    apply(orch, saga_id, "a", "succeeded", result={"id": "a-1"})
    state = orch.abort(saga_id, actor="dave", reason="customer cancelled")
    assert state.status is SagaStatus.COMPENSATING
    assert "aborted by dave: customer cancelled" in (state.reason or "")
    # b was in flight: abandoned, and compensated first (cancel-before-do).
    assert sent(engine)[-1] == ("undo_b", "b", 1)
    [late] = orch.handle_replies([answer(saga_id, "b", "succeeded")])
    assert late.status == "ignored"
    assert orch.get(saga_id).state.steps["b"].status is StepStatus.COMPENSATING
    apply(orch, saga_id, "b", "compensated")
    apply(orch, saga_id, "a", "compensated")
    assert orch.get(saga_id).row.status == "compensated"
    with pytest.raises(OperatorActionError, match="saga is compensated"):
        orch.abort(saga_id, actor="dave", reason="again")


def test_abort_a_saga_parked_before_its_pivot(orch: Orchestrator, engine: Engine) -> None:
    saga_id = parked_before_pivot(orch)
    state = orch.abort(saga_id, actor="erin", reason="give up")
    assert state.status is SagaStatus.COMPENSATING
    # a's outcome is unknown (it errored): compensate it.
    assert sent(engine)[-1] == ("undo_a", "a", 1)
    with pytest.raises(OperatorActionError, match="already compensating"):
        orch.abort(saga_id, actor="erin", reason="twice")


def test_abort_is_refused_once_the_pivot_passed_or_while_it_is_in_flight(
    orch: Orchestrator, engine: Engine
) -> None:
    saga_id = parked_after_pivot(orch)
    before = snapshot(orch, engine, saga_id)
    with pytest.raises(OperatorActionError, match="pivot has passed"):
        orch.abort(saga_id, actor="alice", reason="undo")
    assert snapshot(orch, engine, saga_id) == before

    other = orch.start("ops", {"n": 2})
    apply(orch, other, "a", "succeeded", result={"id": "a-2"})
    apply(orch, other, "b", "succeeded")
    with pytest.raises(OperatorActionError, match="pivot pivot is in flight"):
        orch.abort(other, actor="alice", reason="undo")


def test_resume_a_parked_saga(orch: Orchestrator, engine: Engine, clock: Clock) -> None:
    forward = parked_before_pivot(orch)
    state = orch.resume(forward, actor="frank", reason="upstream fixed")
    assert state.status is SagaStatus.RUNNING
    assert sent(engine)[-1] == ("do_a", "a", 2)
    assert last_history(orch, forward)["event"] == "saga_resumed"

    backward = parked_in_compensation(orch, clock)
    state = orch.resume(backward, actor="frank", reason="db is back")
    assert state.status is SagaStatus.COMPENSATING
    assert sent(engine)[-1] == ("undo_a", "a", 3)
    assert orch.replay(backward) == orch.get(backward).state

    refused = parked_after_pivot(orch)
    before = snapshot(orch, engine, refused)
    with pytest.raises(OperatorActionError, match="x was refused by its participant"):
        orch.resume(refused, actor="frank", reason="try")
    assert snapshot(orch, engine, refused) == before


def test_bad_requests_are_refused_and_change_nothing(
    orch: Orchestrator, engine: Engine, clock: Clock
) -> None:
    parked = parked_after_pivot(orch)
    running = orch.start("ops", {"n": 3})
    snapshots = {s: snapshot(orch, engine, s) for s in (parked, running)}
    with pytest.raises(UnknownSagaError, match="no saga with id"):
        orch.resume(str(uuid.uuid4()), actor="a", reason="r")
    with pytest.raises(UnknownSagaError, match="not a saga id"):
        orch.abort("nope", actor="a", reason="r")
    refusals: list[tuple[Callable[[], object], str]] = [
        (lambda: orch.retry_step(parked, "zz", actor="a", reason="r"), "no step 'zz'"),
        (lambda: orch.retry_step(parked, "y", actor="a", reason="r"), "not the parked step"),
        (lambda: orch.retry_step(running, "a", actor="a", reason="r"), "not parked"),
        (lambda: orch.skip_step(running, "a", actor="a", reason="r"), "not parked"),
        (lambda: orch.resume(running, actor="a", reason="r"), "not parked"),
        (lambda: orch.skip_step(parked, "a", actor="a", reason="r"), "not an unfinished step"),
        (lambda: orch.retry_step(parked, "x", actor=" ", reason="r"), "needs an actor"),
        (lambda: orch.retry_step(parked, "x", actor="a", reason=""), "needs a reason"),
    ]
    for action, message in refusals:
        with pytest.raises(OperatorActionError, match=message):
            action()
    assert {s: snapshot(orch, engine, s) for s in (parked, running)} == snapshots


def test_the_cli(
    orch: Orchestrator,
    engine: Engine,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SAGABOX_DATABASE_URL", db_url)
    monkeypatch.setenv("SAGABOX_SAGAS", "tests.integration.test_operator:registry")
    saga_id = parked_after_pivot(orch)
    fresh = orch.start("ops", {"n": 9})
    with engine.begin() as conn:  # make the first saga an hour old
        conn.execute(
            update(saga)
            .where(saga.c.id == saga_id)
            .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        )

    capsys.readouterr()  # the log lines so far
    assert main(["list", "--older-than", "30m"]) == 0
    out = capsys.readouterr().out
    assert saga_id in out and fresh not in out and "1h" in out
    with pytest.raises(SystemExit) as exit_:
        main(["list", "--older-than", "soon"])
    assert exit_.value.code == 2
    assert "--older-than" in capsys.readouterr().err

    args = ["--by", "ops-team", "--reason", "driver found"]
    assert main(["retry", saga_id, "--step", "y", *args]) == 2
    assert "not the parked step" in capsys.readouterr().err
    assert main(["retry", saga_id, "--step", "x", *args]) == 0
    assert f"saga {saga_id}  ops v1  running" in capsys.readouterr().out
    apply(orch, saga_id, "x", "failed", 2, reason="still unknown")
    assert main(["skip", saga_id, "--step", "x", "--result", "{}", *args]) == 2
    assert "tracking" in capsys.readouterr().err
    skip = ["skip", saga_id, "--step", "x", "--result", '{"tracking": "t"}', *args]
    assert main(skip) == 0
    assert main(["abort", fresh, *args]) == 0
    assert f"saga {fresh}  ops v1  compensating" in capsys.readouterr().out
    assert main(["resume", fresh, *args]) == 2
    assert "not parked" in capsys.readouterr().err
    assert main(["show", saga_id]) == 0
    shown = capsys.readouterr().out
    assert "step_retried x -> running  [by ops-team]  (step x retried by ops-team" in shown
    assert "parked at step" not in shown
    with engine.connect() as conn:
        actors = conn.execute(
            select(history.c.actor).where(history.c.actor.is_not(None)).order_by(history.c.id)
        ).scalars()
        assert list(actors) == ["ops-team"] * 3
