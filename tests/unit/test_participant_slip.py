"""The participants SDK on a routing slip, on the in-memory inbox: a success forwards
the next command instead of replying, anything else replies with the slip's results."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import pytest
from sqlalchemy.orm import Session

from outbox_relay.message import RESULT_REF, Envelope, Slip, SlipStep, decode
from participants import BusinessFailure, Context, Participant, Payload
from participants.replies import outgoing, reply_to, technical_failure
from participants.slip import fill
from participants.testing import MemoryInbox, command, retry

NO_SESSION: Any = None
NEXT_ID = str(uuid.uuid4())


@pytest.fixture
def shop() -> Participant:
    shop = Participant("shop")

    @shop.command("buy", compensation="unbuy")
    def buy(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
        if payload.get("refuse"):
            raise BusinessFailure("no way")
        return {"order": 7} if not payload.get("bare") else {}

    @shop.compensation("unbuy")
    def unbuy(session: Session, payload: Payload, ctx: Context) -> None:
        pass

    return shop


def on_slip(payload: dict[str, Any], *, next_steps: int = 1) -> Envelope:
    ship = SlipStep(
        step="ship",
        participant="shipping",
        type="schedule",
        attempt=2,
        message_id=NEXT_ID,
        payload={"order": {RESULT_REF: ["buy", "order"]}, "ref": {RESULT_REF: ["before", "id"]}},
        result=("shipment",),
    )
    slip = Slip(result=("order",), next=(ship,)[:next_steps], results={"before": {"id": "b-1"}})
    return dataclasses.replace(command("buy", payload, step="buy"), slip=slip)


def test_a_success_forwards_the_next_command_instead_of_replying(
    shop: Participant,
) -> None:
    inbox = MemoryInbox()
    cmd = on_slip({})
    sent = shop.handle(NO_SESSION, cmd, inbox=inbox)
    [(queue, message)] = inbox.sent
    assert message is sent and queue == "shipping"
    assert (message.kind, message.type, message.step, message.attempt) == (
        "command",
        "schedule",
        "ship",
        2,
    )
    assert message.message_id == NEXT_ID and message.causation_id == cmd.message_id
    assert message.correlation_id == cmd.correlation_id and message.reply_to == cmd.reply_to
    assert message.payload == {"order": 7, "ref": "b-1"}
    assert message.slip == Slip(
        result=("shipment",), next=(), results={"before": {"id": "b-1"}, "buy": {"order": 7}}
    )
    # The outbox row goes to the next participant's actor, and decodes back the same.
    row = outgoing(message, queue)
    body = json.loads(row.body)
    assert (body["queue_name"], body["actor_name"]) == ("shipping", "schedule")
    assert decode(row.body) == message
    # The success is stored like any other: a duplicate forwards again, same message id.
    again = shop.handle(NO_SESSION, dataclasses.replace(retry(cmd), slip=cmd.slip), inbox=inbox)
    assert again.message_id == NEXT_ID and again.payload == message.payload


def test_a_refusal_replies_with_what_the_slip_did_before(shop: Participant) -> None:
    inbox = MemoryInbox()
    reply = shop.handle(NO_SESSION, on_slip({"refuse": True}), inbox=inbox)
    [(queue, sent)] = inbox.sent
    assert sent is reply and queue == "sagabox.replies"
    assert (reply.kind, reply.type) == ("reply", "failed")
    assert reply.slip == Slip(results={"before": {"id": "b-1"}})


def test_the_last_step_of_a_slip_replies_with_every_result(shop: Participant) -> None:
    reply = shop.handle(NO_SESSION, on_slip({}, next_steps=0), inbox=MemoryInbox())
    assert (reply.kind, reply.type) == ("reply", "succeeded")
    assert reply.payload == {"result": {"order": 7}}
    assert reply.slip is not None and reply.slip.results == {"before": {"id": "b-1"}}


def test_a_result_without_its_declared_fields_goes_back_to_the_orchestrator(
    shop: Participant,
) -> None:
    reply = shop.handle(NO_SESSION, on_slip({"bare": True}), inbox=MemoryInbox())
    assert (reply.kind, reply.type) == ("reply", "succeeded")


def test_a_technical_failure_reply_carries_the_slips_results() -> None:
    reply = reply_to(on_slip({}), technical_failure(on_slip({}), "boom"))
    assert reply.type == "error"
    assert reply.slip == Slip(results={"before": {"id": "b-1"}})
    assert reply_to(command("buy"), technical_failure(command("buy"), "boom")).slip is None


def test_fill_resolves_placeholders_and_leaves_literals() -> None:
    results = {"a": {"x": {"y": [1, 2]}}}
    assert fill({"v": {RESULT_REF: ["a", "x", "y"]}, "w": [1, {"k": "s"}]}, results) == {
        "v": [1, 2],
        "w": [1, {"k": "s"}],
    }
    with pytest.raises(KeyError):
        fill({RESULT_REF: ["b", "x"]}, results)
