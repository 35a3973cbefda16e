"""A card number sent through the system never reaches a log file, a stored reason or a
dead-letter reason: the saga's payload, a command that crashes on it, and a reply
whose contract error quotes it."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pika
import pytest

from outbox_relay.message import DEFAULT_REPLY_QUEUE, REPLY_ACTOR, encode
from outbox_relay.redaction import PAN_MASK
from participants.testing import command
from tests.integration.test_metrics import System, running_system, wait_until

pytestmark = pytest.mark.integration

CARD = "4111 1111 1111 1111"  # Luhn-valid test card
LEAKS = re.compile(r"4111[ -]?1111[ -]?1111[ -]?1111")


def queue_messages(system: System, queue: str) -> list[tuple[dict[str, object], str]]:
    """(headers, body) of every message in ``queue``, left in place (requeued)."""
    connection = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
    try:
        channel = connection.channel()
        found = []
        while True:
            method, properties, body = channel.basic_get(queue)
            if method is None:
                break
            found.append((dict(properties.headers or {}), body.decode()))
        return found
    finally:
        connection.close()  # unacked: back in the queue


def queue_depth(system: System, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if connection.is_open:
            connection.close()


def publish(system: System, queue: str, body: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(system.amqp_url))
    try:
        connection.channel().basic_publish("", queue, body)
    finally:
        connection.close()


def test_a_card_number_never_reaches_logs_or_reasons(
    template_db: str, amqp_url: str, tmp_path: Path
) -> None:
    reply_xq = f"{DEFAULT_REPLY_QUEUE}.XQ"
    env = {"SAGABOX_PARTICIPANT_MAX_RETRIES": "0"}
    with running_system(template_db, amqp_url, tmp_path, env) as system:
        # 1. Through a saga: the PCI check refuses the raw card, the saga compensates.
        saga_id = system.start(
            "authorize_payment", {"customer": "dave", "amount": 100, "card": CARD}
        )
        assert system.wait_settled([saga_id]) == {saga_id: "compensated"}
        # 2. A command whose handler crashes on it (int('4111 1111 ...')): dead-lettered
        #    at once (no retries), with an error reply quoting the exception.
        crash = command("authorize_payment", {"customer": "dave", "amount": CARD}, step="authorize")
        publish(system, "payment", encode(crash, queue="payment", actor="authorize_payment"))
        # 3. A reply whose contract error quotes it: the orchestrator dead-letters it.
        bad = command("x", saga_id=str(uuid.uuid4())).to_dict()
        bad.update(kind="reply", type="succeeded", reply_to=None, step=CARD)
        publish(system, DEFAULT_REPLY_QUEUE, json.dumps({
            "queue_name": DEFAULT_REPLY_QUEUE, "actor_name": REPLY_ACTOR, "args": [bad],
            "kwargs": {}, "options": {}, "message_id": bad["message_id"], "message_timestamp": 0,
        }))  # fmt: skip
        # The error reply of (2) is for an unknown saga: dead-lettered as well.
        wait_until(lambda: queue_depth(system, reply_xq) == 2, 30, "two dead-lettered replies")
        dead_letters = queue_messages(system, reply_xq)
        reasons = system.scalar(
            "payment",
            "SELECT string_agg(reply_payload::text, ' ') FROM sagabox.command_inbox",
        )
        history = system.scalar(
            "orchestrator", "SELECT string_agg(coalesce(reason, ''), ' ') FROM sagabox.saga_history"
        )

    # The dead-letter reasons said why, with the card masked.
    headers = [str(h.get("x-sagabox-error", "")) for h, _ in dead_letters]
    assert any(PAN_MASK in h for h in headers), headers
    for header in headers:
        assert not LEAKS.search(header)
    error_replies = [json.loads(b)["args"][0] for _, b in dead_letters if "ValueError" in b]
    assert len(error_replies) == 1 and error_replies[0]["type"] == "error"
    assert PAN_MASK in error_replies[0]["payload"]["reason"]
    assert not LEAKS.search(json.dumps(error_replies[0]))
    # Stored reasons (inbox replies, saga history) are clean.
    assert "never a card number" in reasons and not LEAKS.search(reasons)
    assert not LEAKS.search(history or "")
    # No log line anywhere, on stdout or in the log files, quotes it.
    files = sorted((tmp_path / "stdout").glob("*.log")) + sorted((tmp_path / "files").glob("*.log"))
    assert {f.name for f in files} >= {"relay.log", "orchestrator.log", "payment.log"}
    text = {f"{f.parent.name}/{f.name}": f.read_text() for f in files}
    for name, content in text.items():
        assert content, f"{name} is empty"
        assert not LEAKS.search(content), f"{name} leaks the card number"
    # ... and nothing else was masked by mistake: every id is still a whole UUID.
    for content in text.values():
        for line in content.splitlines():
            record = json.loads(line)
            for key in ("correlation_id", "message_id", "causation_id"):
                if record.get(key) is not None:
                    uuid.UUID(record[key])
    payment_log = text["stdout/payment.log"]
    assert "command_dead_lettered" in payment_log and PAN_MASK in payment_log
    assert "reply_dead_lettered" in text["stdout/orchestrator.log"]
