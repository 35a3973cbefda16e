"""``sagabox participant MODULE`` as a real process: it consumes, replies, and stops
cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pika
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

import migrations
from outbox_relay.message import decode, encode
from outbox_relay.table import outbox
from participants.examples.inventory import add_stock, available
from participants.testing import command
from tests import servers

pytestmark = pytest.mark.integration


@pytest.fixture
def inventory_db(db_url: str) -> Iterator[str]:
    migrations.upgrade(db_url, "example_inventory")
    yield db_url


def test_the_cli_runs_a_worker_until_sigterm(inventory_db: str, amqp_url: str) -> None:
    engine = create_engine(inventory_db.replace("postgresql://", "postgresql+psycopg://"))
    with Session(engine) as session, session.begin():
        add_stock(session, "plum", 5)
    broker = RabbitmqBroker(url=amqp_url)
    broker.declare_queue("inventory", ensure=True)  # so the command is not dropped
    broker.close()
    env = dict(
        os.environ,
        SAGABOX_PARTICIPANT_DATABASE_URL=inventory_db,
        SAGABOX_AMQP_URL=amqp_url,
        SAGABOX_INBOX_RETENTION_SECONDS="60",
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sagabox",
            "participant",
            "participants.examples.inventory",
            "--threads",
            "2",
        ],
        env=env,
        cwd=servers.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        cmd = command("reserve_stock", {"sku": "plum", "qty": 2})
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        connection.channel().basic_publish(
            "", "inventory", encode(cmd, queue="inventory", actor="reserve_stock")
        )
        connection.close()
        deadline = time.monotonic() + 30
        bodies: list[str] = []
        while not bodies and time.monotonic() < deadline:
            time.sleep(0.1)
            with engine.connect() as conn:
                bodies = list(conn.execute(select(outbox.c.body)).scalars())
        assert [decode(body).type for body in bodies] == ["succeeded"]
        with Session(engine) as session:
            assert available(session, "plum") == 3
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        engine.dispose()
    assert process.returncode == 0, output
    assert '"event": "participant_worker_stopped"' in output
    assert cmd.correlation_id in output
    assert str(uuid.UUID(cmd.message_id)) in output
