"""SagaWaiter on real PostgreSQL: a caller waits for a saga to settle, woken by the
orchestrator's NOTIFY in the transaction that settles it, not by polling."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Engine

from orchestrator import (
    Orchestrator,
    Registry,
    SagaWaiter,
    UnknownSagaError,
    WaitTimeoutError,
)
from outbox_relay.table import NOTIFY_CHANNEL, OutboxWriter
from sagabox import faults
from tests import servers
from tests.sagas import ORDER
from tests.support import DATA, reply

pytestmark = pytest.mark.integration


@pytest.fixture
def waiter(db_url: str) -> Iterator[SagaWaiter]:
    with SagaWaiter(db_url, reconnect_delay=0.1) as waiter:
        yield waiter


def declined(orch: Orchestrator, saga_id: str) -> None:
    """The first step refused: nothing to undo, the saga is compensated at once."""
    orch.handle_replies([reply(saga_id, "reserve", "failed", reason="out of stock")])


def wait_in_thread(waiter: SagaWaiter, saga_id: str, timeout: float = 10) -> list[object]:
    """A thread waiting for the saga, given 0.3 s to read its status and block: ``box[0]``
    is the thread, what the wait got goes to ``box[1:]``."""
    box: list[object] = []

    def run() -> None:
        try:
            box.append(waiter.wait(saga_id, timeout))
        except Exception as e:
            box.append(e)

    thread = threading.Thread(target=run)
    box.append(thread)  # before start: a wait that returns at once comes after it
    thread.start()
    time.sleep(0.3)
    return box


def joined(box: list[object], timeout: float = 5) -> None:
    """Until the thread of ``wait_in_thread`` ends (what it got is then in ``box[1:]``)."""
    thread = box[0]
    assert isinstance(thread, threading.Thread)
    thread.join(timeout)


def test_a_waiter_wakes_when_the_saga_settles_without_reading_again(
    orch: Orchestrator, waiter: SagaWaiter
) -> None:
    saga_id = orch.start("order", DATA)
    box = wait_in_thread(waiter, saga_id)
    assert len(box) == 1, "returned before the saga settled"
    reads = waiter.reads
    declined(orch, saga_id)
    joined(box)
    assert box[1:] == ["compensated"]
    assert waiter.reads == reads, "woken by a poll, not by the notification"


def test_a_saga_settled_before_the_wait_is_seen_at_once(
    orch: Orchestrator, waiter: SagaWaiter
) -> None:
    saga_id = orch.start("order", DATA)
    declined(orch, saga_id)
    assert waiter.wait(saga_id, timeout=1) == "compensated"


def test_every_saga_settled_in_one_batch_wakes_its_waiters(
    orch: Orchestrator, waiter: SagaWaiter
) -> None:
    ids = [orch.start("order", DATA) for _ in range(5)]
    boxes = [wait_in_thread(waiter, saga_id) for saga_id in ids]
    orch.handle_replies([reply(i, "reserve", "failed", reason="no") for i in ids])
    for box in boxes:
        joined(box)
        assert box[1:] == ["compensated"]


def test_a_wait_times_out_and_an_unknown_saga_is_named(
    orch: Orchestrator, waiter: SagaWaiter
) -> None:
    saga_id = orch.start("order", DATA)
    with pytest.raises(WaitTimeoutError, match=saga_id):
        waiter.wait(saga_id, timeout=0.2)
    missing = str(uuid.uuid4())
    with pytest.raises(UnknownSagaError, match=missing):
        waiter.wait(missing, timeout=0.2)
    with pytest.raises(UnknownSagaError):
        waiter.wait("not-a-uuid", timeout=0.2)


def test_a_saga_settled_while_the_listener_was_cut_off_is_still_reported(
    orch: Orchestrator, waiter: SagaWaiter, db_url: str
) -> None:
    saga_id = orch.start("order", DATA)
    box = wait_in_thread(waiter, saga_id)
    listener = waiter.backend_pids[1]
    with psycopg.connect(db_url, autocommit=True) as admin:
        # Settle the saga while the listening connection is gone: its NOTIFY is lost.
        admin.execute("SELECT pg_terminate_backend(%s)", [listener])
        declined(orch, saga_id)
    joined(box)
    assert box[1:] == ["compensated"]
    assert waiter.backend_pids[1] != listener


@pytest.mark.faults
@pytest.mark.skipif(not faults.iptables_available(), reason="iptables is not installed/usable")
def test_a_listener_whose_connection_was_forgotten_notices_and_listens_again(
    orch: Orchestrator, waiter: SagaWaiter
) -> None:
    # Something between the waiter and PostgreSQL forgets the listening connection
    # without a word: what PostgreSQL sends is lost (the NOTIFY), what the waiter
    # sends meets a reset. Waiting silently, it would sleep through the settling.
    saga_id = orch.start("order", DATA)
    box = wait_in_thread(waiter, saga_id)
    listener = waiter.backend_pids[1]
    with psycopg.connect(servers.PG_ADMIN_URL) as admin:
        row = admin.execute(
            "SELECT client_port FROM pg_stat_activity WHERE pid = %s", [listener]
        ).fetchone()
    assert row is not None and row[0] > 0, "the listener is not on TCP"
    rules = [
        f"INPUT -p tcp -i lo --sport {row[0]} -j REJECT --reject-with tcp-reset".split(),
        f"INPUT -p tcp -i lo --dport {row[0]} ! --tcp-flags RST RST -j DROP".split(),
    ]
    for rule in rules:
        faults.block(rule)
    try:
        time.sleep(3.0)  # past the listener's next statement and its reconnection
        declined(orch, saga_id)
        joined(box)
    finally:
        for rule in rules:
            faults.unblock(rule)
    assert box[1:] == ["compensated"]
    assert waiter.backend_pids[1] != listener


@pytest.mark.parametrize("busy", [False, True], ids=["notifying-writer", "debouncing-writer"])
def test_a_batch_that_settles_one_saga_and_sends_anothers_command_notifies_both(
    engine: Engine, waiter: SagaWaiter, db_url: str, busy: bool
) -> None:
    # A frozen clock makes every write "busy": after its first NOTIFY says so, the
    # writer skips the outbox's NOTIFY, and the settled one must still go out.
    writer = OutboxWriter(clock=lambda: 1.0) if busy else OutboxWriter(quiet_gap=0.0)
    orch = Orchestrator(engine, Registry([ORDER]), outbox=writer)
    settling, moving = orch.start("order", DATA), orch.start("order", DATA)
    box = wait_in_thread(waiter, settling)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        orch.handle_replies(
            [
                reply(settling, "reserve", "failed", reason="no"),
                reply(moving, "reserve", "succeeded", result={"reservation_id": "r"}),
            ]
        )
        outbox_notified = [n.payload for n in listener.notifies(timeout=0.5, stop_after=1)]
    joined(box)
    assert box[1:] == ["compensated"]
    assert orch.get(moving).state.steps["charge"].status.value == "active"
    assert outbox_notified == ([] if busy else [""])


def test_an_orchestrator_told_not_to_notify_leaves_waiters_to_their_timeout(
    engine: Engine, waiter: SagaWaiter
) -> None:
    quiet = Orchestrator(engine, Registry([ORDER]), notify_settled=False)
    saga_id = quiet.start("order", DATA)
    box = wait_in_thread(waiter, saga_id, timeout=1.0)
    declined(quiet, saga_id)
    joined(box)
    assert isinstance(box[1], WaitTimeoutError)
    assert waiter.wait(saga_id, timeout=1) == "compensated"  # a new wait reads it


def test_the_listening_session_reports_its_transactions_while_idle(
    waiter: SagaWaiter, db_url: str
) -> None:
    # Each notification a LISTEN session reads is a transaction of that session, and
    # PostgreSQL reports a session's commits to pg_stat_database only after it runs a
    # statement: a listener that never ran one hid them until it disconnected.
    time.sleep(1.5)  # past the waiter's start, whose statements are reported by now
    before = servers.commits(db_url)
    servers.notify_elsewhere(db_url, 200)
    deadline = time.monotonic() + 5
    while servers.commits(db_url) - before < 350 and time.monotonic() < deadline:
        time.sleep(0.1)
    # 200 by the sender; about 200 more by the waiter's listener, reported within ~1 s.
    assert servers.commits(db_url) - before >= 350


def test_a_marked_wait_reads_no_status_whether_the_saga_settles_before_or_after_it(
    orch: Orchestrator, waiter: SagaWaiter
) -> None:
    reads = waiter.reads
    mark = waiter.mark()
    early = orch.start("order", DATA)
    declined(orch, early)
    time.sleep(0.3)  # heard before the wait begins
    assert waiter.wait(early, timeout=1, since=mark) == "compensated"

    mark = waiter.mark()
    late = orch.start("order", DATA)
    box: list[object] = []
    thread = threading.Thread(target=lambda: box.append(waiter.wait(late, 10, since=mark)))
    thread.start()
    time.sleep(0.3)
    assert box == [], "returned before the saga settled"
    declined(orch, late)
    thread.join(5)
    assert box == ["compensated"]
    assert waiter.reads == reads


def test_a_mark_from_before_the_listener_was_cut_off_reads_the_status(
    orch: Orchestrator, waiter: SagaWaiter, db_url: str
) -> None:
    mark = waiter.mark()
    saga_id = orch.start("order", DATA)
    listener = waiter.backend_pids[1]
    with psycopg.connect(db_url, autocommit=True) as admin:
        # Settled while nobody listens: its NOTIFY is lost, and the mark with it.
        admin.execute("SELECT pg_terminate_backend(%s)", [listener])
        declined(orch, saga_id)
    deadline = time.monotonic() + 5
    while waiter.backend_pids[1:] in ([], [listener]) and time.monotonic() < deadline:
        time.sleep(0.05)
    reads = waiter.reads
    began = time.monotonic()
    assert waiter.wait(saga_id, timeout=5, since=mark) == "compensated"
    assert time.monotonic() - began < 1.0, "waited for a notification that was lost"
    assert waiter.reads == reads + 1


def test_a_mark_older_than_its_window_reads_the_status(orch: Orchestrator, db_url: str) -> None:
    with SagaWaiter(db_url, mark_window=0.3) as waiter:
        mark = waiter.mark()
        saga_id = orch.start("order", DATA)
        declined(orch, saga_id)
        time.sleep(0.6)  # what was heard is remembered no longer than the window
        reads = waiter.reads
        assert waiter.wait(saga_id, timeout=1, since=mark) == "compensated"
        assert waiter.reads == reads + 1


def test_a_marked_wait_still_names_an_id_that_is_no_saga(
    orch: Orchestrator, waiter: SagaWaiter, db_url: str
) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(UnknownSagaError, match=missing):
        waiter.wait(missing, timeout=0.3, since=waiter.mark())
    began = time.monotonic()
    with pytest.raises(UnknownSagaError, match="not-a-uuid"):
        waiter.wait("not-a-uuid", timeout=5, since=waiter.mark())
    assert time.monotonic() - began < 1.0
    saga_id = orch.start("order", DATA)
    with pytest.raises(WaitTimeoutError, match=saga_id):
        waiter.wait(saga_id, timeout=0.3, since=waiter.mark())
    with SagaWaiter(db_url) as other, pytest.raises(ValueError, match="another"):
        waiter.wait(saga_id, timeout=0.3, since=other.mark())


def test_what_a_waiter_heard_is_forgotten_once_no_mark_can_ask_for_it(
    orch: Orchestrator, db_url: str
) -> None:
    with SagaWaiter(db_url, mark_window=0.3) as waiter:
        first = orch.start("order", DATA)
        declined(orch, first)
        time.sleep(0.3)
        assert waiter._heard == {}, "remembered with no mark taken"
        waiter.mark()
        second = orch.start("order", DATA)
        declined(orch, second)
        time.sleep(0.5)
        assert list(waiter._heard) == [second]
        third = orch.start("order", DATA)
        declined(orch, third)  # past the window: heard, not kept, and the second goes
        time.sleep(0.3)
        assert waiter._heard == {}
