"""The participants SDK without servers: declaring, replies, the handling engine on
an in-memory inbox, and the dramatiq middleware on a StubBroker."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from dramatiq import Message, Worker
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries
from prometheus_client import REGISTRY
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from outbox_relay.errors import ConfigurationError, MessageError
from outbox_relay.message import REPLY_ACTOR, Envelope, decode, encode
from participants import BusinessFailure, Context, DefinitionError, Participant, Payload
from participants.context import CONTEXT_KEYS
from participants.handling import on_commit
from participants.inbox import InboxKey, StoredReply
from participants.middleware import ParticipantMiddleware, Rejected, parsed
from participants.replies import outgoing, reply_to, technical_failure
from participants.testing import MemoryInbox, command, compensation, retry
from participants.worker import RetryPolicy, bind
from sagabox.settings import Env
from sagabox.settings.participant import ParticipantSettings

# Handlers here never touch their session; the engine only passes it through.
NO_SESSION: Any = None


class Shop:
    """A participant whose handlers record their calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Payload, Context]] = []
        self.participant = shop = Participant("shop")

        @shop.command("buy", compensation="unbuy")
        def buy(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
            self.calls.append(("buy", payload, ctx))
            if payload.get("refuse"):
                raise BusinessFailure("no way")
            if payload.get("crash"):
                raise RuntimeError("database on fire")
            return {"order": 7}

        @shop.compensation("unbuy")
        def unbuy(session: Session, payload: Payload, ctx: Context) -> None:
            self.calls.append(("unbuy", payload, ctx))
            if payload.get("refuse"):
                raise BusinessFailure("too late")

    def handle(self, inbox: MemoryInbox, envelope: Envelope) -> Envelope:
        return self.participant.handle(NO_SESSION, envelope, inbox=inbox)

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


@pytest.fixture
def shop() -> Shop:
    return Shop()


@pytest.fixture
def inbox() -> MemoryInbox:
    return MemoryInbox()


# -- declaring ---------------------------------------------------------------------------


def test_decorators_register_handlers_and_return_the_function() -> None:
    p = Participant("inventory")

    def reserve(session: Session, payload: Payload, ctx: Context) -> None:
        return None

    assert p.command("reserve", compensation="release")(reserve) is reserve
    p.compensation("release")(lambda s, p, c: None)
    p.validate()
    assert {h.name: h.action for h in p.handlers.values()} == {
        "reserve": "command",
        "release": "compensation",
    }
    assert p.handlers["reserve"].compensation == "release"


def test_a_compensation_without_handler_is_a_definition_error() -> None:
    p = Participant("inventory")
    p.command("reserve", compensation="release")(lambda s, p, c: None)
    with pytest.raises(DefinitionError, match="no handler for compensation"):
        p.validate()


def test_an_orphan_compensation_is_a_definition_error() -> None:
    p = Participant("inventory")
    p.compensation("release")(lambda s, p, c: None)
    with pytest.raises(DefinitionError, match="undo no declared command"):
        p.validate()


def test_names_must_be_valid_and_unique() -> None:
    with pytest.raises(DefinitionError):
        Participant("not a queue")
    p = Participant("inventory")
    p.command("reserve")(lambda s, p, c: None)
    with pytest.raises(DefinitionError, match="declared twice"):
        p.command("reserve")(lambda s, p, c: None)
    with pytest.raises(DefinitionError, match="valid command name"):
        p.command("bad name")(lambda s, p, c: None)


# -- replies -----------------------------------------------------------------------------


def test_a_reply_answers_its_command() -> None:
    cmd = command("buy", {"x": 1}, step="pay", attempt=3, saga="order", version=2)
    reply = reply_to(cmd, StoredReply("succeeded", {"result": {"id": 1}}), clock=lambda: 5.0)
    assert reply.message_id != cmd.message_id
    uuid.UUID(reply.message_id)
    assert (reply.correlation_id, reply.causation_id) == (cmd.correlation_id, cmd.message_id)
    assert (reply.saga, reply.version, reply.step, reply.attempt) == ("order", 2, "pay", 3)
    assert (reply.kind, reply.type, dict(reply.payload)) == (
        "reply",
        "succeeded",
        {"result": {"id": 1}},
    )
    assert reply.sent_at == 5.0


def test_the_outbox_row_carries_a_dramatiq_message_for_the_reply_actor() -> None:
    cmd = command("buy", reply_to="orders.replies")
    reply = reply_to(cmd, StoredReply("failed", {"reason": "no"}))
    row = outgoing(reply, "orders.replies")
    body = json.loads(row.body)
    assert (body["queue_name"], body["actor_name"]) == ("orders.replies", REPLY_ACTOR)
    assert (row.destination, row.message_id, row.correlation_id) == (
        "orders.replies",
        reply.message_id,
        cmd.correlation_id,
    )
    assert decode(row.body) == reply


def test_a_command_without_reply_to_cannot_be_answered() -> None:
    cmd = command("buy")
    no_reply_to = Envelope(**{**cmd.to_dict(), "reply_to": None})
    with pytest.raises(MessageError):
        reply_to(no_reply_to, StoredReply("succeeded"))


def test_technical_failure_replies() -> None:
    cmd = command("buy")
    assert technical_failure(cmd, "boom") == StoredReply("error", {"reason": "boom"})
    comp = compensation("unbuy", cmd)
    assert technical_failure(comp, "boom").type == "compensation_failed"


# -- the engine on an in-memory inbox ----------------------------------------------------


def test_a_command_is_applied_and_answered(shop: Shop, inbox: MemoryInbox) -> None:
    cmd = command("buy", {"sku": "A"}, step="pay", attempt=2)
    reply = shop.handle(inbox, cmd)
    assert (reply.type, dict(reply.payload)) == ("succeeded", {"result": {"order": 7}})
    assert inbox.sent == [(cmd.reply_to, reply)]
    _, payload, ctx = shop.calls[0]
    assert payload == {"sku": "A"}
    assert (ctx.service, ctx.saga_id, ctx.step, ctx.attempt, ctx.message_id, ctx.action) == (
        "shop",
        cmd.correlation_id,
        "pay",
        2,
        cmd.message_id,
        "command",
    )
    assert [c[0] for c in inbox.calls] == ["claim", "savepoint", "record", "send"]


def test_a_duplicate_gets_the_stored_reply_again(shop: Shop, inbox: MemoryInbox) -> None:
    cmd = command("buy")
    first = shop.handle(inbox, cmd)
    second = shop.handle(inbox, cmd)
    assert shop.names() == ["buy"]
    assert (second.type, second.payload) == (first.type, first.payload)
    assert second.message_id != first.message_id
    assert second.causation_id == cmd.message_id


def test_a_new_attempt_gets_the_stored_reply_with_its_own_ids(
    shop: Shop, inbox: MemoryInbox
) -> None:
    cmd = command("buy")
    first = shop.handle(inbox, cmd)
    again = retry(cmd)
    second = shop.handle(inbox, again)
    assert shop.names() == ["buy"]
    assert (second.attempt, second.causation_id) == (2, again.message_id)
    assert second.payload == first.payload


def test_a_business_failure_is_stored_as_failed(shop: Shop, inbox: MemoryInbox) -> None:
    cmd = command("buy", {"refuse": True})
    assert shop.handle(inbox, cmd).payload == {"reason": "no way"}
    assert shop.handle(inbox, retry(cmd)).type == "failed"
    assert shop.names() == ["buy"]


def test_a_technical_error_propagates_and_stores_nothing(shop: Shop, inbox: MemoryInbox) -> None:
    with pytest.raises(RuntimeError):
        shop.handle(inbox, command("buy", {"crash": True}))
    assert inbox.sent == []


def test_compensation_before_command_cancels_it(shop: Shop, inbox: MemoryInbox) -> None:
    cmd = command("buy")
    comp = compensation("unbuy", cmd)
    assert shop.handle(inbox, comp).type == "compensated"
    key = InboxKey(cmd.correlation_id, cmd.step, "command")
    assert inbox.rows[key].status == "tombstone"
    late = shop.handle(inbox, cmd)
    assert (late.type, late.causation_id) == ("cancelled", cmd.message_id)
    assert shop.calls == []


def test_compensation_after_command_runs_the_handler(shop: Shop, inbox: MemoryInbox) -> None:
    cmd = command("buy")
    shop.handle(inbox, cmd)
    comp = compensation("unbuy", cmd, reason="user cancelled")
    assert shop.handle(inbox, comp).type == "compensated"
    assert shop.handle(inbox, retry(comp)).type == "compensated"
    assert shop.names() == ["buy", "unbuy"]
    _, payload, ctx = shop.calls[1]
    assert payload == {"reason": "user cancelled"}
    assert (ctx.action, ctx.command_result) == ("compensation", {"order": 7})


def test_compensation_of_a_failed_command_does_nothing(shop: Shop, inbox: MemoryInbox) -> None:
    cmd = command("buy", {"refuse": True})
    shop.handle(inbox, cmd)
    assert shop.handle(inbox, compensation("unbuy", cmd)).type == "compensated"
    assert shop.names() == ["buy"]


def test_a_refused_compensation_is_not_stored_so_its_retry_runs_again(
    shop: Shop, inbox: MemoryInbox
) -> None:
    cmd = command("buy")
    shop.handle(inbox, cmd)
    comp = compensation("unbuy", cmd, refuse=True)
    assert shop.handle(inbox, comp).payload == {"reason": "too late"}
    assert InboxKey(cmd.correlation_id, cmd.step, "compensation") not in inbox.rows
    assert shop.handle(inbox, compensation("unbuy", cmd, attempt=2)).type == "compensated"
    assert shop.names() == ["buy", "unbuy", "unbuy"]


@pytest.mark.parametrize(
    ("envelope", "match"),
    [
        (command("nope"), "no handler"),
        (command("buy", kind="compensation"), "is a command"),
        (Envelope(**{**command("buy").to_dict(), "reply_to": None}), "reply_to"),
    ],
)
def test_messages_it_cannot_take_raise_message_error(
    shop: Shop, inbox: MemoryInbox, envelope: Envelope, match: str
) -> None:
    with pytest.raises(MessageError, match=match):
        shop.handle(inbox, envelope)
    assert inbox.calls == []


def test_handle_takes_the_dict_an_actor_receives(shop: Shop, inbox: MemoryInbox) -> None:
    assert shop.participant.handle(NO_SESSION, command("buy").to_dict(), inbox=inbox).type == (
        "succeeded"
    )
    with pytest.raises(MessageError):
        shop.participant.handle(NO_SESSION, {"message_id": "x"}, inbox=inbox)


def test_memory_inbox_reset(shop: Shop, inbox: MemoryInbox) -> None:
    shop.handle(inbox, command("buy"))
    inbox.reset()
    assert (inbox.rows, inbox.sent, inbox.calls) == ({}, [], [])


# -- dramatiq: binding and middleware ----------------------------------------------------


@pytest.fixture
def stub_broker() -> Iterator[StubBroker]:
    broker = StubBroker()
    broker.emit_after("process_boot")
    yield broker
    broker.close()


def _proxy(actor: str, args: tuple[Any, ...], queue: str = "shop") -> MessageProxy:
    return MessageProxy(
        Message(queue_name=queue, actor_name=actor, args=args, kwargs={}, options={})
    )


def test_bind_declares_one_actor_per_handler_before_retries(
    shop: Shop, stub_broker: StubBroker
) -> None:
    engine = create_engine("postgresql+psycopg://unused@127.0.0.1:1/none")
    binding = bind(shop.participant, stub_broker, engine, retries=RetryPolicy(max_retries=2))
    assert set(binding.actors) == {"buy", "unbuy"}
    assert {a.queue_name for a in binding.actors.values()} == {"shop"}
    assert binding.actors["buy"].options["max_retries"] == 2
    assert binding.actors["buy"].options["throws"] == (MessageError,)
    kinds = [type(m) for m in stub_broker.middleware]
    assert kinds.index(ParticipantMiddleware) < kinds.index(Retries)
    # A second participant on the same broker shares the middleware.
    other = Participant("other")
    other.command("ping")(lambda s, p, c: None)
    bind(other, stub_broker, engine)
    assert [type(m) for m in stub_broker.middleware].count(ParticipantMiddleware) == 1


def test_middleware_binds_the_message_context_and_clears_it(
    shop: Shop, stub_broker: StubBroker
) -> None:
    engine = create_engine("postgresql+psycopg://unused@127.0.0.1:1/none")
    bind(shop.participant, stub_broker, engine)
    middleware = next(m for m in stub_broker.middleware if isinstance(m, ParticipantMiddleware))
    cmd = command("buy", step="pay", attempt=2)
    message = _proxy("buy", (cmd.to_dict(),))
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        middleware.before_process_message(stub_broker, message)
        structlog.get_logger().info("inside")
        middleware.after_process_message(stub_broker, message, result=None)
        structlog.get_logger().info("after")
    inside, after = logs
    assert {k: inside[k] for k in CONTEXT_KEYS} == {
        "service": "shop",
        "correlation_id": cmd.correlation_id,
        "message_id": cmd.message_id,
        "causation_id": None,
        "saga": cmd.saga,
        "version": cmd.version,
        "step": "pay",
        "attempt": 2,
        "type": "buy",
    }
    assert not set(CONTEXT_KEYS) & set(after)


@pytest.mark.parametrize(
    "args",
    [
        ({"message_id": "not a uuid"},),
        (),
        ("a", "b"),
        (command("unbuy", kind="command").to_dict(),),
    ],
)
def test_middleware_rejects_an_invalid_envelope_before_the_actor_runs(
    shop: Shop, stub_broker: StubBroker, args: tuple[Any, ...]
) -> None:
    engine = create_engine("postgresql+psycopg://unused@127.0.0.1:1/none")
    bind(shop.participant, stub_broker, engine)
    middleware = next(m for m in stub_broker.middleware if isinstance(m, ParticipantMiddleware))
    actor = "unbuy" if args and isinstance(args[0], dict) and "type" in args[0] else "buy"
    message = _proxy(actor, args)
    with structlog.testing.capture_logs() as logs, pytest.raises(Rejected):
        middleware.before_process_message(stub_broker, message)
    assert message.failed
    assert logs[0]["event"] == "message_rejected"
    assert logs[0]["dead_letter_queue"] == "shop.XQ"


def test_a_stub_worker_dead_letters_a_bad_message_and_goes_on(
    shop: Shop, stub_broker: StubBroker
) -> None:
    engine = create_engine("postgresql+psycopg://unused@127.0.0.1:1/none")
    bind(shop.participant, stub_broker, engine)
    worker = Worker(stub_broker, worker_timeout=50)
    worker.start()
    try:
        stub_broker.enqueue(_proxy("buy", ({"bad": 1},))._message)
        stub_broker.join("shop", fail_fast=False)
        worker.join()
    finally:
        worker.stop()
    assert len(stub_broker.dead_letters_by_queue["shop"]) == 1


def test_wire_body_round_trip_reaches_the_actor_argument() -> None:
    cmd = command("buy", {"n": 1})
    body = encode(cmd, queue="shop", actor="buy")
    message = Message.decode(body.encode())
    assert (message.queue_name, message.actor_name, message.args) == (
        "shop",
        "buy",
        (cmd.to_dict(),),
    )


# -- settings ----------------------------------------------------------------------------


def test_settings_from_env() -> None:
    settings = ParticipantSettings.from_env(
        Env(
            {
                "SAGABOX_PARTICIPANT_DATABASE_URL": "postgresql://u@h/db",
                "SAGABOX_AMQP_URL": "amqp://guest:guest@h:5672/v",
                "SAGABOX_PARTICIPANT_THREADS": "3",
                "SAGABOX_INBOX_RETENTION_SECONDS": "60",
                "SAGABOX_PARTICIPANT_MAX_RETRIES": "0",
            }
        )
    )
    config = settings.worker_config()
    assert config.database_url == "postgresql+psycopg://u@h/db"
    assert (config.threads, config.retention.total_seconds(), config.retries.max_retries) == (
        3,
        60.0,
        0,
    )
    defaults = ParticipantSettings.from_env(Env({})).worker_config()
    assert defaults.retention.days == 7
    with pytest.raises(ConfigurationError, match="SAGABOX_INBOX_RETENTION_SECONDS"):
        ParticipantSettings.from_env(Env({"SAGABOX_INBOX_RETENTION_SECONDS": "soon"}))


def test_the_envelope_the_middleware_parsed_is_taken_once_and_only_for_its_arguments() -> None:
    raw, other = {"a": 1}, {"a": 1}
    envelope = command("buy", {})
    parsed.raw, parsed.envelope = raw, envelope
    assert parsed.take(other) is None  # an equal dict is not the same delivery
    parsed.raw, parsed.envelope = raw, envelope
    assert parsed.take(raw) is envelope
    assert parsed.take(raw) is None  # taken once


def test_metrics_of_a_handling_wait_for_its_commit(shop: Shop, inbox: MemoryInbox) -> None:
    def handled() -> float:
        labels = {"participant": "shop", "kind": "command", "type": "buy", "outcome": "succeeded"}
        return REGISTRY.get_sample_value("sagabox_participant_handled_total", labels) or 0.0

    before = handled()
    with on_commit():  # rolled back: never committed, never counted
        shop.handle(inbox, command("buy", saga_id=str(uuid.uuid4())))
    assert handled() == before
    with on_commit() as committed:
        shop.handle(inbox, command("buy", saga_id=str(uuid.uuid4())))
        assert handled() == before
        committed()
    assert handled() == before + 1
    shop.handle(inbox, command("buy", saga_id=str(uuid.uuid4())))  # no transaction around
    assert handled() == before + 2
