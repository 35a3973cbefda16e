"""The participants SDK against PostgreSQL: one transaction per message, at most once.

Uses the inventory example (its tables come from Alembic branch example_inventory)
and a probe participant whose handler writes a visible effect before deciding.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg import pq
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import IntegrityError, ProgrammingError
from sqlalchemy.orm import Session, registry

import migrations
from outbox_relay.message import REPLY_ACTOR, Envelope, Slip, SlipStep, decode
from outbox_relay.roundtrips import Tail, driver
from outbox_relay.table import outbox
from participants import BusinessFailure, Context, Participant, Payload, purge_inbox
from participants.broker import ParticipantBroker
from participants.errors import SavepointNeeded
from participants.examples import BRANCHES
from participants.examples.inventory import add_stock, available, inventory, reserved, stock
from participants.inbox import InboxKey
from participants.store import LateClaims, PostgresInbox, claim_late
from participants.tables import command_inbox
from participants.testing import command, compensation, retry
from participants.worker import Binding, InboxPurge
from tests import servers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def examples_template(template_db: str) -> Iterator[str]:
    """The session template plus every example service's branch, copied once per module."""
    name = f"sagabox_ptpl_{uuid.uuid4().hex[:10]}"
    servers.admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        for branch in BRANCHES:
            migrations.upgrade(servers.database_url(name), branch)
        yield name
    finally:
        servers.drop_database(name)


@pytest.fixture
def engine(examples_template: str) -> Iterator[Engine]:
    with servers.database_from(examples_template) as url:
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        yield engine
        engine.dispose()


class Probe:
    """A participant whose command adds a stock row (a visible effect), then decides."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.lock = threading.Lock()
        self.participant = probe = Participant("probe")

        @probe.command("probe_do", compensation="probe_undo")
        def do(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
            with self.lock:
                self.calls.append(f"do:{ctx.attempt}")
            add_stock(session, f"probe-{ctx.saga_id}", 1)
            time.sleep(float(payload.get("sleep", 0)))
            if payload.get("refuse"):
                raise BusinessFailure("refused after writing")
            if payload.get("crash"):
                raise RuntimeError("crashed after writing")
            if payload.get("bad_sql"):
                session.execute(text("SELECT * FROM no_such_table"))
            return {"calls": len(self.calls)}

        @probe.compensation("probe_undo")
        def undo(session: Session, payload: Payload, ctx: Context) -> None:
            with self.lock:
                self.calls.append("undo")
            session.execute(stock.delete().where(stock.c.sku == f"probe-{ctx.saga_id}"))
            if payload.get("refuse"):
                raise BusinessFailure("cannot undo yet")


@pytest.fixture
def probe() -> Probe:
    return Probe()


def handle(engine: Engine, participant: Participant, envelope: Envelope) -> Envelope:
    with Session(engine) as session, session.begin():
        return participant.handle(session, envelope)


def replies(engine: Engine, saga_id: str) -> list[tuple[str, Envelope]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(outbox.c.destination, outbox.c.body, outbox.c.message_id)
            .where(outbox.c.correlation_id == uuid.UUID(saga_id))
            .order_by(outbox.c.id)
        ).all()
    result = []
    for row in rows:
        envelope = decode(row.body)
        assert str(row.message_id) == envelope.message_id
        result.append((row.destination, envelope))
    return result


def inbox_rows(engine: Engine, saga_id: str) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(command_inbox).where(command_inbox.c.saga_id == uuid.UUID(saga_id))
        ).all()
    return {row.action: (row.status, row.reply_type) for row in rows}


def probe_effect(engine: Engine, saga_id: str) -> int:
    with Session(engine) as session:
        return available(session, f"probe-{saga_id}")


def seed(engine: Engine, sku: str = "apple", qty: int = 10) -> None:
    with Session(engine) as session, session.begin():
        add_stock(session, sku, qty)


def test_a_command_writes_one_inbox_row_its_effect_and_one_reply(engine: Engine) -> None:
    seed(engine)
    cmd = command("reserve_stock", {"sku": "apple", "qty": 3}, step="reserve", reply_to="orders.r")
    reply = handle(engine, inventory, cmd)
    assert inbox_rows(engine, cmd.correlation_id) == {"command": ("done", "succeeded")}
    with Session(engine) as session:
        assert (available(session, "apple"), reserved(session, "apple")) == (7, 3)
    [(destination, sent)] = replies(engine, cmd.correlation_id)
    assert destination == "orders.r"
    assert sent == reply
    assert (sent.kind, sent.type, sent.causation_id, sent.step, sent.attempt) == (
        "reply",
        "succeeded",
        cmd.message_id,
        "reserve",
        1,
    )
    assert set(sent.payload["result"]) == {"reservation_id", "sku", "qty"}
    with engine.connect() as conn:
        body = conn.execute(select(outbox.c.body)).scalar_one()
    assert f'"actor_name":"{REPLY_ACTOR}"' in body


def test_a_duplicate_delivery_applies_nothing_and_re_emits_the_reply(engine: Engine) -> None:
    seed(engine)
    cmd = command("reserve_stock", {"sku": "apple", "qty": 3})
    first = handle(engine, inventory, cmd)
    second = handle(engine, inventory, cmd)
    with Session(engine) as session:
        assert (available(session, "apple"), reserved(session, "apple")) == (7, 3)
    sent = [envelope for _, envelope in replies(engine, cmd.correlation_id)]
    assert sent == [first, second]
    assert second.message_id != first.message_id
    assert (second.type, second.payload, second.causation_id) == (
        "succeeded",
        first.payload,
        cmd.message_id,
    )


def test_a_new_attempt_after_a_timeout_gets_the_stored_reply(engine: Engine) -> None:
    seed(engine)
    cmd = command("reserve_stock", {"sku": "apple", "qty": 3})
    first = handle(engine, inventory, cmd)
    again = retry(cmd)
    second = handle(engine, inventory, again)
    with Session(engine) as session:
        assert available(session, "apple") == 7
    assert (second.attempt, second.causation_id, second.payload) == (
        2,
        again.message_id,
        first.payload,
    )
    assert len(replies(engine, cmd.correlation_id)) == 2


def test_a_business_failure_rolls_back_effects_and_keeps_the_failed_reply(
    engine: Engine, probe: Probe
) -> None:
    cmd = command("probe_do", {"refuse": True})
    reply = handle(engine, probe.participant, cmd)
    assert (reply.type, dict(reply.payload)) == ("failed", {"reason": "refused after writing"})
    assert probe_effect(engine, cmd.correlation_id) == 0
    assert inbox_rows(engine, cmd.correlation_id) == {"command": ("done", "failed")}
    assert handle(engine, probe.participant, retry(cmd)).type == "failed"
    assert probe.calls == ["do:1"]


def test_out_of_stock_is_a_business_failure(engine: Engine) -> None:
    seed(engine, qty=1)
    reply = handle(engine, inventory, command("reserve_stock", {"sku": "apple", "qty": 2}))
    assert (reply.type, reply.payload["reason"]) == ("failed", "out of stock: apple")


def test_a_technical_error_rolls_everything_back(engine: Engine, probe: Probe) -> None:
    cmd = command("probe_do", {"crash": True})
    with pytest.raises(RuntimeError):
        handle(engine, probe.participant, cmd)
    assert inbox_rows(engine, cmd.correlation_id) == {}
    assert replies(engine, cmd.correlation_id) == []
    assert probe_effect(engine, cmd.correlation_id) == 0
    # dramatiq's retry of the same message then applies it.
    ok = Envelope(**{**cmd.to_dict(), "payload": {}})
    assert handle(engine, probe.participant, ok).type == "succeeded"
    assert probe_effect(engine, cmd.correlation_id) == 1


def test_compensation_before_the_command_leaves_a_tombstone(engine: Engine, probe: Probe) -> None:
    cmd = command("probe_do")
    comp = compensation("probe_undo", cmd)
    assert handle(engine, probe.participant, comp).type == "compensated"
    assert inbox_rows(engine, cmd.correlation_id) == {
        "command": ("tombstone", "cancelled"),
        "compensation": ("done", "compensated"),
    }
    late = handle(engine, probe.participant, cmd)
    assert (late.type, late.causation_id) == ("cancelled", cmd.message_id)
    assert handle(engine, probe.participant, retry(cmd)).type == "cancelled"
    assert probe.calls == []
    assert probe_effect(engine, cmd.correlation_id) == 0
    assert [e.type for _, e in replies(engine, cmd.correlation_id)] == [
        "compensated",
        "cancelled",
        "cancelled",
    ]


def test_compensation_after_the_command_undoes_it_once(engine: Engine) -> None:
    seed(engine)
    cmd = command("reserve_stock", {"sku": "apple", "qty": 4})
    handle(engine, inventory, cmd)
    comp = compensation("release_stock", cmd)
    assert handle(engine, inventory, comp).type == "compensated"
    duplicate = handle(engine, inventory, retry(comp))
    assert (duplicate.type, duplicate.attempt) == ("compensated", 2)
    with Session(engine) as session:
        assert (available(session, "apple"), reserved(session, "apple")) == (10, 0)


def test_compensation_of_a_failed_command_does_not_call_the_handler(
    engine: Engine, probe: Probe
) -> None:
    cmd = command("probe_do", {"refuse": True})
    handle(engine, probe.participant, cmd)
    assert handle(engine, probe.participant, compensation("probe_undo", cmd)).type == (
        "compensated"
    )
    assert probe.calls == ["do:1"]


def test_a_refused_compensation_keeps_the_effect_and_is_retried(
    engine: Engine, probe: Probe
) -> None:
    cmd = command("probe_do")
    handle(engine, probe.participant, cmd)
    refused = handle(engine, probe.participant, compensation("probe_undo", cmd, refuse=True))
    assert (refused.type, dict(refused.payload)) == (
        "compensation_failed",
        {"reason": "cannot undo yet"},
    )
    assert probe_effect(engine, cmd.correlation_id) == 1
    assert inbox_rows(engine, cmd.correlation_id) == {"command": ("done", "succeeded")}
    again = compensation("probe_undo", cmd, attempt=2)
    assert handle(engine, probe.participant, again).type == "compensated"
    assert probe_effect(engine, cmd.correlation_id) == 0
    assert probe.calls == ["do:1", "undo", "undo"]


def test_concurrent_duplicates_apply_once(engine: Engine, probe: Probe) -> None:
    cmd = command("probe_do", {"sleep": 0.5})
    results: list[Envelope] = []
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            results.append(handle(engine, probe.participant, cmd))
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert probe.calls == ["do:1"]
    assert probe_effect(engine, cmd.correlation_id) == 1
    assert [r.type for r in results] == ["succeeded", "succeeded"]
    assert results[0].payload == results[1].payload
    assert len(replies(engine, cmd.correlation_id)) == 2


def test_a_compensation_racing_its_command_waits_and_undoes_it(
    engine: Engine, probe: Probe
) -> None:
    cmd = command("probe_do", {"sleep": 0.5})
    comp = compensation("probe_undo", cmd)
    outcome: dict[str, str] = {}
    first = threading.Thread(
        target=lambda: outcome.update(c=handle(engine, probe.participant, cmd).type)
    )
    first.start()
    time.sleep(0.2)  # the command holds its inbox row by now
    outcome["comp"] = handle(engine, probe.participant, comp).type
    first.join(timeout=10)
    assert outcome == {"c": "succeeded", "comp": "compensated"}
    assert probe.calls == ["do:1", "undo"]
    assert probe_effect(engine, cmd.correlation_id) == 0


def test_purge_deletes_only_rows_older_than_the_window(engine: Engine, probe: Probe) -> None:
    old, recent = command("probe_do"), command("probe_do")
    handle(engine, probe.participant, old)
    handle(
        engine,
        probe.participant,
        compensation("probe_undo", command("probe_do", saga_id=old.correlation_id, step="other")),
    )
    handle(engine, probe.participant, recent)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE sagabox.command_inbox SET received_at = now() - interval '2 hours'"
                " WHERE saga_id = :id"
            ),
            {"id": uuid.UUID(old.correlation_id)},
        )
    assert purge_inbox(engine, timedelta(hours=1), batch_size=2) == 3  # done row + tombstone pair
    assert inbox_rows(engine, old.correlation_id) == {}
    assert inbox_rows(engine, recent.correlation_id) == {"command": ("done", "succeeded")}
    assert purge_inbox(engine, 3600) == 0
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(command_inbox)) == 1


def test_the_worker_purge_thread_deletes_old_rows(engine: Engine, probe: Probe) -> None:
    old = command("probe_do")
    handle(engine, probe.participant, old)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE sagabox.command_inbox SET received_at = now() - interval '8 days'")
        )
    purge = InboxPurge(engine, retention=timedelta(days=7), interval=0.05)
    purge.after_worker_boot(None, None)  # type: ignore[arg-type]  # neither is used
    try:
        deadline = time.monotonic() + 10
        while inbox_rows(engine, old.correlation_id) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        purge.before_worker_shutdown(None, None)  # type: ignore[arg-type]
    assert inbox_rows(engine, old.correlation_id) == {}


# ------------------------------ a routing slip whose next step is this participant's


def step_rows(engine: Engine, saga_id: str) -> dict[str, str | None]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(command_inbox).where(command_inbox.c.saga_id == uuid.UUID(saga_id))
        ).all()
    return {row.step: row.reply_type for row in rows}


def one_then_two(two: dict[str, Any]) -> Envelope:
    """probe_do as step one, its slip naming probe_do again (step two, same participant)."""
    second = SlipStep(
        step="two",
        participant="probe",
        type="probe_do",
        attempt=1,
        message_id=str(uuid.uuid4()),
        payload=two,
        result=(),
    )
    first = command("probe_do", {}, step="one", reply_to="orders.r")
    return dataclasses.replace(first, slip=Slip(result=(), next=(second,)))


def test_the_next_step_here_runs_in_the_same_transaction_and_one_reply_goes_out(
    engine: Engine, probe: Probe
) -> None:
    cmd = one_then_two({})
    reply = handle(engine, probe.participant, cmd)
    assert probe_effect(engine, cmd.correlation_id) == 2
    assert step_rows(engine, cmd.correlation_id) == {"one": "succeeded", "two": "succeeded"}
    [(destination, sent)] = replies(engine, cmd.correlation_id)
    assert destination == "orders.r" and sent == reply
    assert (sent.type, sent.step) == ("succeeded", "two")
    assert sent.slip is not None and set(sent.slip.results) == {"one"}
    # A redelivery of the first command runs nothing and answers the same.
    again = handle(engine, probe.participant, cmd)
    assert (again.type, again.step, again.payload) == ("succeeded", "two", sent.payload)
    assert probe.calls == ["do:1", "do:1"] and probe_effect(engine, cmd.correlation_id) == 2


def test_a_refusal_of_the_next_step_here_keeps_the_first_step(engine: Engine, probe: Probe) -> None:
    cmd = one_then_two({"refuse": True})
    reply = handle(engine, probe.participant, cmd)
    assert (reply.type, reply.step) == ("failed", "two")
    assert probe_effect(engine, cmd.correlation_id) == 1
    assert step_rows(engine, cmd.correlation_id) == {"one": "succeeded", "two": "failed"}
    assert [e for _, e in replies(engine, cmd.correlation_id)] == [reply]


def test_an_optimistic_worker_redoes_a_refusal_of_the_next_step_with_savepoints(
    engine: Engine, probe: Probe
) -> None:
    cmd = one_then_two({"refuse": True})
    with Session(engine) as session, session.begin():
        with pytest.raises(SavepointNeeded):
            probe.participant.handle(session, cmd, optimistic=True)
        session.rollback()
    assert step_rows(engine, cmd.correlation_id) == {}
    assert handle(engine, probe.participant, cmd).type == "failed"
    assert probe_effect(engine, cmd.correlation_id) == 1


@pytest.mark.parametrize("optimistic", [False, True])
def test_a_technical_error_in_the_next_step_here_sends_it_as_a_message(
    engine: Engine, probe: Probe, optimistic: bool
) -> None:
    cmd = one_then_two({"crash": True})
    with Session(engine) as session, session.begin():
        sent = probe.participant.handle(session, cmd, optimistic=optimistic)
    # The first step committed; the second, rolled back to its savepoint, left as a
    # command to this participant's own queue, to be retried on its own.
    assert probe_effect(engine, cmd.correlation_id) == 1
    assert step_rows(engine, cmd.correlation_id) == {"one": "succeeded"}
    [(destination, forwarded)] = replies(engine, cmd.correlation_id)
    assert destination == "probe" and forwarded == sent
    assert (forwarded.kind, forwarded.step, forwarded.type) == ("command", "two", "probe_do")
    assert cmd.slip is not None and forwarded.message_id == cmd.slip.next[0].message_id


def test_a_workers_technical_error_in_the_next_step_here_sends_it_as_a_message(
    engine: Engine, probe: Probe, binding: Binding
) -> None:
    # As above, in the worker's transaction, whose savepoints ride with its held-back
    # statements: the rollback to the second step's savepoint keeps the first step.
    cmd, other = one_then_two({"crash": True}), command("probe_do")
    binding.apply([other, cmd])
    assert probe_effect(engine, cmd.correlation_id) == 1
    assert step_rows(engine, cmd.correlation_id) == {"one": "succeeded"}
    [(destination, forwarded)] = replies(engine, cmd.correlation_id)
    assert destination == "probe" and (forwarded.step, forwarded.type) == ("two", "probe_do")
    assert [e.type for _, e in replies(engine, other.correlation_id)] == ["succeeded"]
    assert probe.calls == ["do:1"] * 3


@pytest.fixture
def binding(engine: Engine, probe: Probe, amqp_url: str) -> Iterator[Binding]:
    """The probe bound as a worker binds it, on a pool of one traceable connection."""
    one = create_engine(engine.url, pool_size=1, max_overflow=0)
    broker = ParticipantBroker(url=amqp_url)
    try:
        yield probe.participant.bind(broker, one)
    finally:
        broker.close()
        one.dispose()


def round_trips(binding: Binding, envelopes: list[Envelope], trace_file: Path) -> int:
    """``binding.apply(envelopes)``, one transaction: the round trips it waited on."""
    with binding.engine.connect() as conn:
        raw = driver(conn)
        raw.pgconn.trace(os.open(trace_file, os.O_WRONLY | os.O_CREAT))
        raw.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
    try:
        binding.apply(envelopes)
    finally:
        raw.pgconn.untrace()
    return trace_file.read_text().count("ReadyForQuery")


def test_a_batch_writes_each_inbox_row_with_its_reply(
    engine: Engine, probe: Probe, binding: Binding, tmp_path: Path
) -> None:
    fresh = [command("probe_do") for _ in range(4)]
    waited = round_trips(binding, fresh, tmp_path / "protocol.txt")
    # BEGIN with the first handler's statement, each other handler's, then COMMIT with
    # every reply, each carrying its inbox row. With the keys claimed ahead in one
    # statement: 6 (7 with psycopg's BEGIN a wait of its own); a claim per message: 9.
    assert waited == 4 + 1
    protocol = (tmp_path / "protocol.txt").read_text()
    # BEGIN, then the first handler's statement, in one pipeline: one Sync.
    first = protocol[: protocol.index("ReadyForQuery")]
    assert '"BEGIN' in first and "INSERT INTO" in first and first.count("Sync") == 1, first
    assert "unnest" not in protocol and "UPDATE sagabox.command_inbox" not in protocol
    assert protocol.count("INSERT INTO sagabox.command_inbox") == 4
    for cmd in fresh:
        assert inbox_rows(engine, cmd.correlation_id) == {"command": ("done", "succeeded")}
        [(_, reply)] = replies(engine, cmd.correlation_id)
        assert (reply.type, reply.causation_id) == ("succeeded", cmd.message_id)
        assert probe_effect(engine, cmd.correlation_id) == 1
    assert probe.calls == ["do:1"] * 4


def test_another_database_error_is_redone_once_claiming_first_then_raised(
    engine: Engine, probe: Probe, binding: Binding
) -> None:
    ok = command("probe_do")
    bad = command("probe_do", {"bad_sql": True})
    with pytest.raises(ProgrammingError):
        binding.apply([ok, bad])
    # Both ran twice: claiming late, then claiming first; nothing of either stayed.
    assert probe.calls == ["do:1"] * 4
    for cmd in (ok, bad):
        assert inbox_rows(engine, cmd.correlation_id) == {}
        assert replies(engine, cmd.correlation_id) == []
        assert probe_effect(engine, cmd.correlation_id) == 0


def test_a_key_claimed_late_with_no_reply_sent_is_still_inserted_at_commit(
    engine: Engine,
) -> None:
    # Every handling path sends a reply for the key it claims; should one not, the row
    # must still be there after the commit, and a duplicate of it must fail the commit.
    saga_id = str(uuid.uuid4())
    key = InboxKey(saga_id, "step", "command")
    row = {"command": ("done", None)}
    for attempt in (1, 2):
        late: LateClaims = {}
        tail = Tail()
        with Session(engine) as session, session.begin():
            inbox = PostgresInbox(session, tail=tail, late=late)
            assert inbox.claim(key, str(uuid.uuid4())) is None
            # Nothing written yet: the claim is only remembered.
            assert late and inbox_rows(engine, saga_id) == ({} if attempt == 1 else row)
            claim_late(tail, late)
            assert not late
            if attempt == 1:
                tail.commit(session)
            else:
                with pytest.raises(IntegrityError):
                    tail.commit(session)
        assert inbox_rows(engine, saga_id) == row


def test_a_duplicate_in_a_batch_is_undone_and_redone_with_the_keys_claimed_first(
    engine: Engine, probe: Probe, binding: Binding, tmp_path: Path
) -> None:
    done = command("probe_do")
    handle(engine, probe.participant, done)
    fresh = [command("probe_do") for _ in range(4)]
    again = retry(done)  # already answered: its key is in the inbox
    waited = round_trips(binding, [*fresh, again], tmp_path / "protocol.txt")
    # The first try: BEGIN with the first handler's statement, 4 more, then COMMIT,
    # which the answered key's row fails; ROLLBACK. The redo: BEGIN with the keys
    # claimed ahead in one statement, 4 handlers, the answered key's claim and lock,
    # then COMMIT with the replies.
    assert waited == (5 + 1 + 1) + (1 + 4 + 2 + 1)
    protocol = (tmp_path / "protocol.txt").read_text()
    assert protocol.index("command_inbox_pkey") < protocol.index("unnest"), protocol
    for cmd in fresh:
        assert inbox_rows(engine, cmd.correlation_id) == {"command": ("done", "succeeded")}
        [(_, reply)] = replies(engine, cmd.correlation_id)
        assert (reply.type, reply.causation_id) == ("succeeded", cmd.message_id)
        assert probe_effect(engine, cmd.correlation_id) == 1
    # The answered command got its stored reply; its run in the first try was undone.
    first, second = (e for _, e in replies(engine, done.correlation_id))
    assert second.type == "succeeded" and second.payload == first.payload
    assert probe_effect(engine, done.correlation_id) == 1
    assert probe.calls == ["do:1"] * 5 + ["do:2"] + ["do:1"] * 4


@pytest.mark.parametrize("together", [False, True], ids=["before", "same_batch"])
def test_a_command_its_compensation_overtook_in_a_batch_applies_nothing(
    engine: Engine, probe: Probe, binding: Binding, together: bool
) -> None:
    # The batch claims late (no slip): the command's row, inserted with its reply, meets
    # the tombstone its compensation wrote, committed before or earlier in the same
    # transaction; the batch is redone claiming first, and the command is cancelled.
    cmd = command("probe_do")
    other = command("probe_do")
    undo = compensation("probe_undo", cmd)
    if together:
        binding.apply([undo, cmd, other])
    else:
        binding.apply([undo])
        binding.apply([cmd, other])
    assert inbox_rows(engine, cmd.correlation_id) == {
        "command": ("tombstone", "cancelled"),
        "compensation": ("done", "compensated"),
    }
    assert [e.type for _, e in replies(engine, cmd.correlation_id)] == ["compensated", "cancelled"]
    assert probe_effect(engine, cmd.correlation_id) == 0
    assert inbox_rows(engine, other.correlation_id) == {"command": ("done", "succeeded")}
    assert probe_effect(engine, other.correlation_id) == 1
    # Both ran in the first try, undone with it; the redo ran only the other.
    assert probe.calls == ["do:1"] * 3


def test_messages_of_one_saga_in_a_batch_claim_in_their_own_order(
    engine: Engine, probe: Probe, binding: Binding
) -> None:
    # A key claimed ahead belongs to its message: the compensation arriving first must
    # still tombstone its command, and another attempt of a slip's next step must find
    # that step answered here, not an empty row claimed ahead of it.
    cmd = command("probe_do")
    slip = one_then_two({})
    two = command("probe_do", saga_id=slip.correlation_id, step="two")  # another attempt
    others = [command("probe_do") for _ in range(2)]
    binding.apply([compensation("probe_undo", cmd), cmd, slip, two, *others])
    assert inbox_rows(engine, cmd.correlation_id) == {
        "command": ("tombstone", "cancelled"),
        "compensation": ("done", "compensated"),
    }
    assert [e.type for _, e in replies(engine, cmd.correlation_id)] == ["compensated", "cancelled"]
    assert probe_effect(engine, cmd.correlation_id) == 0
    assert step_rows(engine, slip.correlation_id) == {"one": "succeeded", "two": "succeeded"}
    assert probe_effect(engine, slip.correlation_id) == 2
    # The slip's answer, then the other attempt's: the stored one, the same.
    answered, duplicate = (e for _, e in replies(engine, slip.correlation_id))
    assert (
        (answered.step, answered.type) == (duplicate.step, duplicate.type) == ("two", "succeeded")
    )
    assert duplicate.payload == answered.payload
    for other in others:
        assert step_rows(engine, other.correlation_id) == {"step": "succeeded"}
    assert probe.calls == ["do:1"] * 4


def test_a_command_ahead_of_its_compensation_in_one_batch_is_undone_by_it(
    engine: Engine, probe: Probe, binding: Binding
) -> None:
    cmd = command("probe_do")
    binding.apply([cmd, compensation("probe_undo", cmd)])
    assert inbox_rows(engine, cmd.correlation_id) == {
        "command": ("done", "succeeded"),
        "compensation": ("done", "compensated"),
    }
    assert [e.type for _, e in replies(engine, cmd.correlation_id)] == ["succeeded", "compensated"]
    assert probe_effect(engine, cmd.correlation_id) == 0
    assert probe.calls == ["do:1", "undo"]


def test_a_refusals_redo_sends_each_savepoint_with_what_was_held_back(
    engine: Engine, probe: Probe, binding: Binding, tmp_path: Path
) -> None:
    # The second command refuses: the transaction is redone with a savepoint for it
    # and each command after it. SAVEPOINT goes with the statements held back, RELEASE
    # waits for the next one: one round trip per savepoint, where it took three.
    ok = [command("probe_do") for _ in range(3)]
    refused = command("probe_do", {"refuse": True})
    batch = [ok[0], refused, ok[1], ok[2]]
    with binding.engine.connect() as conn:
        # psycopg preparing a statement on its fifth run would add a wait of its own.
        driver(conn).prepare_threshold = None
    waited = round_trips(binding, batch, tmp_path / "protocol.txt")
    protocol = (tmp_path / "protocol.txt").read_text()
    # First try: BEGIN with the first handler's statement, the second handler's,
    # ROLLBACK. The redo: BEGIN with the first handler's statement, then for each of
    # the 3 others SAVEPOINT (with what is held back) and its handler, the refused
    # one's ROLLBACK TO, and COMMIT. (14 with the keys claimed ahead, 16 with psycopg's
    # BEGIN a wait of its own, 21 when each savepoint sent what was held back one
    # statement at a time, then SAVEPOINT, and RELEASE on its own.)
    assert waited == 3 + 1 + 3 * 2 + 1 + 1
    assert protocol.count("SAVEPOINT sa_savepoint") == 3 + 1 + 2  # set, undone, released
    for cmd in ok:
        [(_, reply)] = replies(engine, cmd.correlation_id)
        assert reply.type == "succeeded" and probe_effect(engine, cmd.correlation_id) == 1
        assert inbox_rows(engine, cmd.correlation_id) == {"command": ("done", "succeeded")}
    [(_, reply)] = replies(engine, refused.correlation_id)
    assert (reply.type, reply.payload["reason"]) == ("failed", "refused after writing")
    assert probe_effect(engine, refused.correlation_id) == 0
    assert inbox_rows(engine, refused.correlation_id) == {"command": ("done", "failed")}
    assert probe.calls == ["do:1"] * 2 + ["do:1"] * 4


class Shelf:
    """A stock row as an ORM object: handlers written with the ORM refuse too."""

    def __init__(self, sku: str, available: int) -> None:
        self.sku = sku
        self.available = available


registry().map_imperatively(Shelf, stock)


def orm_participant() -> Participant:
    orm = Participant("orm")

    @orm.command("orm_put")
    def put(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
        sku = str(payload.get("sku", f"orm-{ctx.saga_id}"))
        session.add(Shelf(sku, 1))
        how = payload.get("refuse")
        if how == "pending":
            raise BusinessFailure("refused, the object not flushed")
        if how == "flushed":
            session.flush()
            raise BusinessFailure("refused after flushing")
        try:
            session.flush()
        except IntegrityError as e:
            raise BusinessFailure(f"{sku} is on the shelf already") from e
        return {"sku": sku}

    return orm


def test_an_orm_handlers_refusal_in_a_batch_leaves_none_of_its_objects(
    engine: Engine, amqp_url: str
) -> None:
    # Refused with an object added, with one flushed, and with a flush that failed (a
    # duplicate key, told as a business refusal): each undone in its savepoint, the
    # commands around them kept.
    seed(engine, "apple")
    broker = ParticipantBroker(url=amqp_url)
    try:
        binding = orm_participant().bind(broker, engine)
        ok = [command("orm_put") for _ in range(3)]
        pending = command("orm_put", {"refuse": "pending"})
        flushed = command("orm_put", {"refuse": "flushed"})
        duplicate = command("orm_put", {"sku": "apple"})
        binding.apply([ok[0], pending, ok[1], flushed, duplicate, ok[2]])
        # The failed flush first: the transaction without savepoints is rolled back
        # with the session in the state a failed flush leaves it.
        first, alone = command("orm_put", {"sku": "apple"}), command("orm_put")
        binding.apply([first, alone])
        ok.append(alone)
    finally:
        broker.close()
    for cmd in ok:
        [(_, reply)] = replies(engine, cmd.correlation_id)
        assert reply.type == "succeeded" and probe_effect(engine, cmd.correlation_id) == 0
        with Session(engine) as session:
            assert available(session, f"orm-{cmd.correlation_id}") == 1
    for cmd, reason in [
        (pending, "refused, the object not flushed"),
        (flushed, "refused after flushing"),
        (duplicate, "apple is on the shelf already"),
        (first, "apple is on the shelf already"),
    ]:
        [(_, reply)] = replies(engine, cmd.correlation_id)
        assert (reply.type, reply.payload["reason"]) == ("failed", reason)
        with Session(engine) as session:
            assert available(session, f"orm-{cmd.correlation_id}") == 0
    with Session(engine) as session:
        assert available(session, "apple") == 10
