"""The relay under faults: killed mid-batch, broker connections cut, broker stopped,
database connections killed, SIGTERM under load. Nothing is ever lost."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
import pytest

from tests import servers
from tests.integration.test_relay import (
    consume,
    make_rows,
    outbox_count,
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
