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
from participants.inbox import InboxKey
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


# ------------------------------------------- a slip's next step on the same participant

WRAP_ID = str(uuid.uuid4())


@pytest.fixture
def counter() -> dict[str, int]:
    return {"buy": 0, "wrap": 0}


@pytest.fixture
def store(counter: dict[str, int]) -> Participant:
    """buy, then wrap, on one participant: wrap refuses or breaks when told to."""
    store = Participant("store")

    @store.command("buy")
    def buy(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
        counter["buy"] += 1
        return {"order": 7}

    @store.command("wrap")
    def wrap(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
        counter["wrap"] += 1
        if payload.get("refuse"):
            raise BusinessFailure("no paper")
        if payload.get("break"):
            raise RuntimeError("printer on fire")
        return {"parcel": f"p-{payload['order']}"}

    return store


def buy_then_wrap(wrap_payload: dict[str, Any], *, then_ship: bool = True) -> Envelope:
    wrap = SlipStep(
        step="wrap",
        participant="store",
        type="wrap",
        attempt=1,
        message_id=WRAP_ID,
        payload={"order": {RESULT_REF: ["buy", "order"]}, **wrap_payload},
        result=("parcel",),
    )
    ship = SlipStep(
        step="ship",
        participant="shipping",
        type="schedule",
        attempt=1,
        message_id=NEXT_ID,
        payload={"parcel": {RESULT_REF: ["wrap", "parcel"]}},
        result=(),
    )
    slip = Slip(result=("order",), next=(wrap, ship)[: 2 if then_ship else 1])
    return dataclasses.replace(command("buy", {}, step="buy"), slip=slip)


def test_the_next_step_on_the_same_participant_is_handled_in_the_same_transaction(
    store: Participant, counter: dict[str, int]
) -> None:
    inbox = MemoryInbox()
    cmd = buy_then_wrap({})
    sent = store.handle(NO_SESSION, cmd, inbox=inbox)
    # One message leaves: the command after wrap, to the next participant.
    [(queue, message)] = inbox.sent
    assert message is sent and queue == "shipping" and message.message_id == NEXT_ID
    assert message.payload == {"parcel": "p-7"}
    assert message.causation_id == WRAP_ID
    assert message.slip == Slip(results={"buy": {"order": 7}, "wrap": {"parcel": "p-7"}})
    # Both steps are in the inbox, answered, their replies stored with that one send.
    buy_key = InboxKey(cmd.correlation_id, "buy", "command")
    wrap_key = InboxKey(cmd.correlation_id, "wrap", "command")
    assert inbox.rows[wrap_key].message_id == WRAP_ID
    assert inbox.rows[buy_key].reply.type == inbox.rows[wrap_key].reply.type == "succeeded"
    assert [c for c in inbox.calls if c[0] in {"record", "send"}] == [
        ("record", buy_key),
        ("record", wrap_key),
        ("send", NEXT_ID),
    ]
    # A duplicate of the first command runs nothing and sends the same command again.
    again = store.handle(NO_SESSION, dataclasses.replace(retry(cmd), slip=cmd.slip), inbox=inbox)
    assert again.message_id == NEXT_ID and again.payload == message.payload
    assert counter == {"buy": 1, "wrap": 1}


def test_the_last_step_handled_here_replies_with_both_results(store: Participant) -> None:
    inbox = MemoryInbox()
    reply = store.handle(NO_SESSION, buy_then_wrap({}, then_ship=False), inbox=inbox)
    [(queue, sent)] = inbox.sent
    assert sent is reply and queue == "sagabox.replies"
    assert (reply.type, reply.step, reply.causation_id) == ("succeeded", "wrap", WRAP_ID)
    assert reply.payload == {"result": {"parcel": "p-7"}}
    assert reply.slip == Slip(results={"buy": {"order": 7}})


def test_a_refusal_of_the_step_handled_here_keeps_the_step_before(store: Participant) -> None:
    inbox = MemoryInbox()
    cmd = buy_then_wrap({"refuse": True})
    reply = store.handle(NO_SESSION, cmd, inbox=inbox)
    assert [m for _, m in inbox.sent] == [reply]
    assert (reply.type, reply.step) == ("failed", "wrap")
    assert reply.slip == Slip(results={"buy": {"order": 7}})
    assert inbox.rows[InboxKey(cmd.correlation_id, "buy", "command")].reply.type == "succeeded"
    assert inbox.rows[InboxKey(cmd.correlation_id, "wrap", "command")].reply.type == "failed"


def test_a_technical_failure_of_the_step_handled_here_sends_it_as_a_message(
    store: Participant, counter: dict[str, int]
) -> None:
    inbox = MemoryInbox()
    cmd = buy_then_wrap({"break": True})
    sent = store.handle(NO_SESSION, cmd, inbox=inbox)
    # Rolled back to its savepoint: buy is answered, wrap goes out as the message it is.
    [(queue, message)] = inbox.sent
    assert message is sent and queue == "store" and message.message_id == WRAP_ID
    assert message.payload == {"order": 7, "break": True}
    assert inbox.rows[InboxKey(cmd.correlation_id, "buy", "command")].reply.type == "succeeded"
    assert InboxKey(cmd.correlation_id, "wrap", "command") not in inbox.rows
    # Delivered, it fails on its own: the worker's retries are wrap's, not buy's.
    with pytest.raises(RuntimeError):
        store.handle(NO_SESSION, message, inbox=inbox)
    assert counter == {"buy": 1, "wrap": 2}
