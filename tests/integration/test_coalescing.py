"""The relay's AMQP writes: a published batch leaves in a few ``send`` calls, not three
per message, and arrives whole and in order (outbox_relay.coalescing)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from typing import Any

import pika
import pytest

from outbox_relay.broker import ConfirmingChannel, Confirms, connect_amqp
from outbox_relay.store import OutboxRow
from outbox_relay.topology import Topology

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("messages", "pad", "most_sends"),
    [
        (60, 900, 3),  # a usual batch: one send, or a few if the socket is full
        # 2.4 MB at once: partial sends, if any, re-queue a slice of one buffer.
        (600, 8000, 20),
    ],
)
def test_a_batch_goes_out_in_a_few_sends_whole_and_in_order(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch, messages: int, pad: int, most_sends: int
) -> None:
    queue = f"coalescing-{uuid.uuid4().hex[:8]}"
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as setup:
        setup.channel().queue_declare(queue, durable=True)
    bodies = [f'{{"n": {i}, "pad": "{"x" * (i * 37 % pad)}"}}' for i in range(messages)]
    rows = [
        OutboxRow(i, str(uuid.uuid4()), None, "", queue, body, None, 0)
        for i, body in enumerate(bodies)
    ]
    sends: list[int] = []
    real_send = socket.socket.send

    def counting_send(self: socket.socket, data: Any, *args: Any) -> int:
        sends.append(len(data))
        return real_send(self, data, *args)

    async def publish() -> list[Any]:
        connection, _ = await connect_amqp(amqp_url, 5)
        try:
            channel = await ConfirmingChannel.open(connection, Topology(), 5)
            confirms = Confirms(len(rows))
            monkeypatch.setattr(socket.socket, "send", counting_send)
            channel.publish(rows, confirms)
            outcomes = await asyncio.wait_for(confirms.done, 10)
            monkeypatch.undo()
            return outcomes
        finally:
            connection.close()

    outcomes = asyncio.run(publish())
    assert [o[0] for o in outcomes if o] == ["ack"] * messages
    # pika alone: one send per frame, three frames per message.
    assert len(sends) <= most_sends, f"{len(sends)} sends for {messages} messages"
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as check:
        channel = check.channel()
        received = []
        for _ in range(messages):
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            assert method is not None
            received.append((properties.message_id, body.decode()))
    assert received == [(r.message_id, r.body) for r in rows]
