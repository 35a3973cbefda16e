"""The relay under faults: killed mid-batch, broker connections cut, broker stopped,
database connections killed, SIGTERM under load. Nothing is ever lost."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from sagabox import faults
from tests import servers
from tests.integration.test_relay import (
    consume,
    count,
    leads,
    make_rows,
    outbox_count,
    published,
    relay_config,
    relay_process,
    running_relay,
    vhost_name,
    wait_until,
    write_rows,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def message_ids(amqp_url: str) -> list[str]:
    return [properties.message_id for properties, _ in consume(amqp_url, idle=1.0)]


def test_killed_between_confirm_and_delete_publishes_again(
    db_url: str, amqp_url: str, tmp_path: Path
) -> None:
    rows = make_rows(20)
    write_rows(db_url, rows)
    process = relay_process(
        [db_url],
        amqp_url,
        tmp_path / "relay.log",
        SAGABOX_FAILPOINTS="relay.after_confirm_before_mark=exit",
    )
    try:
        assert process.wait(timeout=30) == 137, (tmp_path / "relay.log").read_text()
    finally:
        process.kill()
    # Confirmed by RabbitMQ, but the process died before deleting: the rows stay.
    assert outbox_count(db_url) == 20
    with running_relay(relay_config([db_url], amqp_url)):
        wait_until(lambda: outbox_count(db_url) == 0, 20, "the outbox to drain")
    received = message_ids(amqp_url)
    expected = [message_id for message_id, *_ in rows]
    assert sorted(received) == sorted(expected * 2)  # each twice, with the same message id


def test_connections_closed_by_the_broker_mid_batch_lose_nothing(
    db_url: str, amqp_url: str, tmp_path: Path
) -> None:
    rows = make_rows(20_000)
    write_rows(db_url, rows)
    log = tmp_path / "relay.log"
    process = relay_process([db_url], amqp_url, log)
    try:
        wait_until(lambda: outbox_count(db_url) < 18_000, 30, "publishing to start")
        servers.rabbitmqctl(
            "close_all_connections",
            "--vhost",
            vhost_name(amqp_url),
            "test: connections cut mid-batch",
        )
        wait_until(lambda: outbox_count(db_url) == 0, 90, "the relay to recover and drain")
        assert process.poll() is None, log.read_text()  # recovered by itself
    finally:
        process.terminate()
        process.wait(15)
    text = log.read_text()
    assert '"relay_reconnecting"' in text and '"relay_reconnected"' in text
    received = set(message_ids(amqp_url))
    assert received == {message_id for message_id, *_ in rows}


def test_a_stopped_broker_leaves_a_backlog_that_drains_when_it_returns(
    db_url: str, amqp_url: str
) -> None:
    first, second = make_rows(200), make_rows(300)
    with running_relay(relay_config([db_url], amqp_url)):
        write_rows(db_url, first)
        wait_until(lambda: outbox_count(db_url) == 0, 20, "the first rows")
        try:
            servers.rabbitmqctl("stop_app")
            write_rows(db_url, second)
            time.sleep(1.5)  # the relay keeps trying to reconnect meanwhile
            assert outbox_count(db_url) == len(second)
        finally:
            servers.rabbitmqctl("start_app")
            servers.rabbitmqctl("await_startup")
        wait_until(lambda: outbox_count(db_url) == 0, 60, "the backlog to drain")
    received = set(message_ids(amqp_url))
    assert received == {message_id for message_id, *_ in first + second}


def test_killed_database_connections_are_reopened(db_url: str, amqp_url: str) -> None:
    rows = make_rows(5_000)
    write_rows(db_url, rows)
    database = db_url.rsplit("/", 1)[1]
    with running_relay(relay_config([db_url], amqp_url, batch_size=100)) as relay:
        wait_until(lambda: relay.counters.published >= 500, 30, "publishing to start")
        with psycopg.connect(servers.PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
        more = make_rows(100)
        write_rows(db_url, more)
        wait_until(lambda: outbox_count(db_url) == 0, 60, "the relay to recover and drain")
    assert set(message_ids(amqp_url)) == {message_id for message_id, *_ in rows + more}


def test_sigterm_under_load_exits_0_and_keeps_every_unconfirmed_row(
    db_url: str, amqp_url: str, tmp_path: Path
) -> None:
    rows = make_rows(20_000)
    write_rows(db_url, rows)
    log = tmp_path / "relay.log"
    process = relay_process([db_url], amqp_url, log)
    try:
        wait_until(lambda: outbox_count(db_url) < 18_000, 30, "publishing to start")
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=15) == 0, log.read_text()
        assert time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
    assert '"relay_stopped"' in log.read_text()
    with psycopg.connect(db_url) as conn:
        remaining = {str(r[0]) for r in conn.execute("SELECT message_id FROM sagabox.outbox")}
    published = set(message_ids(amqp_url))
    assert 0 < len(remaining) < len(rows)
    # Every row is either still in the table or was confirmed (so is in the queue).
    assert published | remaining == {message_id for message_id, *_ in rows}


def test_run_relay_cli_end_to_end(db_url: str, amqp_url: str, tmp_path: Path) -> None:
    """The real process drains, logs, and stops on SIGTERM."""
    rows = make_rows(50)
    log = tmp_path / "relay.log"
    process = relay_process([db_url], amqp_url, log)
    try:
        write_rows(db_url, rows)
        wait_until(lambda: outbox_count(db_url) == 0, 30, "the outbox to drain")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert '"relay_started"' in text and '"relay_stopped"' in text
    assert '"published": 50' in text
    assert sorted(message_ids(amqp_url)) == sorted(m for m, *_ in rows)


def log_says(path: Path, event: str) -> bool:
    return path.exists() and f'"{event}"' in path.read_text()


def standby_pair(
    db_url: str, amqp_url: str, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path, subprocess.Popen[bytes], Path]:
    """Two relay processes on one database: the first leads, the second stands by."""
    fast = {"SAGABOX_RELAY_STANDBY_POLL_INTERVAL": "0.2"}
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = relay_process([db_url], amqp_url, first_log, **fast)
    wait_until(lambda: log_says(first_log, "relay_leading"), 20, "the first relay to lead")
    second = relay_process([db_url], amqp_url, second_log, **fast)
    wait_until(lambda: log_says(second_log, "relay_standing_by"), 20, "the second to stand by")
    return first, first_log, second, second_log


def test_a_standby_takes_over_from_a_killed_leader_and_nothing_is_lost(
    db_url: str, amqp_url: str, tmp_path: Path
) -> None:
    first, _, second, second_log = standby_pair(db_url, amqp_url, tmp_path)
    rows = make_rows(3_000)
    try:
        for chunk in range(0, 1_500, 100):
            write_rows(db_url, rows[chunk : chunk + 100])
        first.kill()  # mid-stream: some of those rows may be claimed, unconfirmed
        first.wait(timeout=10)
        for chunk in range(1_500, 3_000, 100):
            write_rows(db_url, rows[chunk : chunk + 100])
        wait_until(lambda: outbox_count(db_url) == 0, 30, "the standby to drain the outbox")
        assert log_says(second_log, "relay_leading")
        assert '"took_over": true' in second_log.read_text()
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
    received = message_ids(amqp_url)
    assert set(received) == {message_id for message_id, *_ in rows}


@pytest.mark.skipif(not faults.iptables_available(), reason="iptables is not installed/usable")
def test_a_silent_leader_loses_the_lead_to_the_standby_within_the_keepalives(
    db_url: str, amqp_url: str, tmp_path: Path
) -> None:
    """The leader's listening session goes silent (its packets dropped): PostgreSQL's
    keepalives end that session, the lock goes to the standby, and the old leader,
    once its own keepalives give up, stands by."""
    first, first_log, second, second_log = standby_pair(db_url, amqp_url, tmp_path)
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            # This database's lock: a relay of another test may still hold its own.
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.granted"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    assert row is not None and row[0] > 0, "the leader's session is not on TCP"
    rule = ["INPUT", "-p", "tcp", "-i", "lo", "--sport", str(row[0]), "-j", "DROP"]
    # Until the standby leads, no new session reaches PostgreSQL either: the old
    # leader's own keepalives end its session about when PostgreSQL's end the other
    # side, and from a new session it would race the standby for the lock, as a leader
    # cut off by the network could not (it won once in CI).
    port = urlsplit(db_url).port or 5432
    no_new_sessions = ["INPUT", "-p", "tcp", "-i", "lo", "--dport", str(port), "--syn"]
    no_new_sessions += ["-j", "DROP"]
    rows = make_rows(200)
    announcing = threading.Event()
    # Writers' NOTIFYs keep flowing to the silent session: unacknowledged data, so its
    # end comes from tcp_user_timeout, not from keepalives alone.
    announcer = psycopg.connect(db_url, autocommit=True)

    def announce() -> None:
        with announcer:
            while not announcing.wait(0.3):
                announcer.execute("SELECT pg_notify('sagabox_outbox', '')")

    faults.block(rule)
    faults.block(no_new_sessions)
    notifier = threading.Thread(target=announce, daemon=True)
    notifier.start()
    try:
        silenced = time.monotonic()
        wait_until(lambda: log_says(second_log, "relay_leading"), 40, "the standby to lead")
        took = time.monotonic() - silenced
        # 11 s: keepalives (5 s idle, then 3 probes 2 s apart) or the user timeout
        assert 8 < took < 30, took
        faults.unblock(no_new_sessions)
        announcing.set()
        write_rows(db_url, rows)
        wait_until(lambda: outbox_count(db_url) == 0, 30, "the new leader to drain")
        wait_until(
            lambda: log_says(first_log, "relay_leadership_lost"), 30, "the old leader to notice"
        )
        wait_until(
            lambda: log_says(first_log, "relay_standing_by"), 30, "the old leader to stand by"
        )
        assert leads(db_url)
    finally:
        announcing.set()
        faults.unblock(no_new_sessions)
        faults.unblock(rule)
        for process in (first, second):
            if process.poll() is None:
                process.kill()
    assert set(message_ids(amqp_url)) == {message_id for message_id, *_ in rows}


@pytest.mark.skipif(not faults.iptables_available(), reason="iptables is not installed/usable")
def test_a_listener_whose_connection_was_forgotten_notices_and_listens_again(
    db_url: str, amqp_url: str
) -> None:
    """Something between the relay and PostgreSQL forgets their connections without a
    word (a restarted NAT, a host that came back): what PostgreSQL sends is lost, what
    the relay sends is answered by a reset. A listener that only waited would stay deaf
    (polling is a minute away here, and the server does not know either); its
    once-a-second statement meets the reset, and it connects and listens again."""
    config = relay_config([db_url], amqp_url, idle_poll_interval=60.0, exclusive=False)
    with running_relay(config):
        time.sleep(1.0)  # connected and listening
        with psycopg.connect(db_url) as conn:
            ports = [
                row[0]
                for row in conn.execute(
                    "SELECT client_port FROM pg_stat_activity WHERE datname ="
                    " current_database() AND application_name LIKE 'sagabox relay %'"
                )
            ]
        assert ports and all(port > 0 for port in ports), ports
        rules = []
        for port in ports:
            # What the relay sends meets a reset; what PostgreSQL sends is lost (the
            # resets excepted, so that they reach the relay).
            rules.append(f"INPUT -p tcp -i lo --sport {port} -j REJECT --reject-with tcp-reset")
            rules.append(f"INPUT -p tcp -i lo --dport {port} ! --tcp-flags RST RST -j DROP")
        for rule in rules:
            faults.block(rule.split())
        try:
            time.sleep(3.0)  # past the listener's next statement and its reconnection
            rows = make_rows(5)
            write_rows(db_url, rows)  # announced with a NOTIFY
            wait_until(lambda: published(amqp_url) == 5, 10, "the announced rows to go out")
        finally:
            for rule in rules:
                faults.unblock(rule.split())
    assert set(message_ids(amqp_url)) == {message_id for message_id, *_ in rows}


def test_a_frozen_leader_is_helped_by_the_standby_and_its_claimed_rows_freed(
    db_url: str, amqp_url: str, tmp_path: Path
) -> None:
    """SIGSTOP: the leader's sockets stay open (its lock too) but it does nothing. The
    standby sees its sessions run no statement and claims; the rows the frozen leader
    had claimed are freed when PostgreSQL ends its idle transaction (confirm timeout +
    10 s)."""
    quick = {
        "SAGABOX_RELAY_STANDBY_POLL_INTERVAL": "0.2",
        "SAGABOX_RELAY_TAKEOVER_AFTER": "3",
        "SAGABOX_RELAY_CONFIRM_TIMEOUT": "2",
    }
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    # The leader holds its first batch's claim open: published, confirmed, not deleted.
    first = relay_process(
        [db_url],
        amqp_url,
        first_log,
        SAGABOX_FAILPOINTS="relay.after_confirm_before_mark=sleep:600",
        **quick,
    )
    second: subprocess.Popen[bytes] | None = None
    held, later = make_rows(50), make_rows(50)
    try:
        wait_until(lambda: log_says(first_log, "relay_leading"), 20, "the first relay to lead")
        second = relay_process([db_url], amqp_url, second_log, **quick)
        wait_until(lambda: log_says(second_log, "relay_standing_by"), 20, "a standby")
        write_rows(db_url, held)
        wait_until(lambda: published(amqp_url) == len(held), 20, "the leader to publish")
        wait_until(lambda: idle_in_transaction(db_url) > 0, 20, "the leader to hold a claim")
        first.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        write_rows(db_url, later)
        wait_until(lambda: log_says(second_log, "relay_leader_silent"), 20, "the standby to help")
        wait_until(lambda: outbox_count(db_url) == 0, 60, "every row to go out")
        # The held rows waited for PostgreSQL to end the frozen claim (12 s here).
        assert time.monotonic() - frozen > 8
    finally:
        first.send_signal(signal.SIGCONT)
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    received = message_ids(amqp_url)
    assert set(received) == {m for m, *_ in held + later}
    # Confirmed once by the frozen leader and again by the standby: at least once.
    counts = sorted(received.count(m) for m, *_ in held)
    assert counts == [2] * len(held), counts


def idle_in_transaction(db_url: str) -> int:
    return count(
        db_url,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND state = 'idle in transaction'",
    )
