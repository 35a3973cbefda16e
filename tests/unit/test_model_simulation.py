"""A model-level simulation of the whole system, in memory: the real pure machine on
the orchestrator's side, the real participant SDK (with its in-memory inbox) on the
services' side, and a hostile network between them that duplicates, reorders and
delays messages, while nodes crash between their commit and their ack and the clock
jumps. Invariants hold after every step; at teardown the network drains and every
saga settles with its effects consistent."""

from __future__ import annotations

import contextlib
import random
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from orchestrator import Registry, Retry, Saga, Step, data, result
from orchestrator.events import TimersDue, event_from_reply
from orchestrator.machine import Command, start, transition
from orchestrator.state import SETTLED, SagaState, SagaStatus
from outbox_relay.errors import MessageError
from outbox_relay.message import DEFAULT_REPLY_QUEUE, Envelope, decode
from participants import BusinessFailure, Context, Participant, Payload
from participants.testing import MemoryInbox

STOCK = 12
FUNDS = {"ann": 500, "ben": 40}

SHOP = Saga(
    "shop",
    version=1,
    input={"customer": str, "qty": int, "amount": int},
    steps=[
        Step(
            "reserve",
            "stock",
            "reserve",
            compensation="release",
            payload={"qty": data("qty")},
            result=("reservation",),
            timeout=5,
            retry=Retry(max_attempts=3, initial=1.0),
        ),
        Step(
            "charge",
            "bank",
            "charge",
            compensation="refund",
            payload={
                "customer": data("customer"),
                "amount": data("amount"),
                "reservation": result("reserve", "reservation"),
            },
            timeout=5,
            retry=Retry(max_attempts=2, initial=2.0),
        ),
    ],
)
# The same saga on a routing slip: the stock service forwards the charge itself.
SHOP_SLIP = replace(SHOP, version=2, routing_slip=True)
# Both steps on one service (the store): it handles the charge in the reserve's
# transaction, no message in between.
SHOP_LOCAL = replace(
    SHOP,
    version=3,
    routing_slip=True,
    steps=[replace(step, participant="store") for step in SHOP.steps if isinstance(step, Step)],
)
Registry([SHOP, SHOP_SLIP, SHOP_LOCAL])


@dataclass
class Services:
    """The services' own 'databases': what was applied, keyed by saga."""

    stock: int = STOCK
    reservations: dict[str, int] = field(default_factory=dict)
    funds: dict[str, int] = field(default_factory=lambda: dict(FUNDS))
    charges: dict[str, tuple[str, int]] = field(default_factory=dict)
    applied: list[tuple[str, str]] = field(default_factory=list)


def build_participants(world: Services) -> dict[str, Participant]:
    stock, bank, store = Participant("stock"), Participant("bank"), Participant("store")

    @store.command("reserve", compensation="release")
    @stock.command("reserve", compensation="release")
    def reserve(_: Any, payload: Payload, ctx: Context) -> dict[str, Any]:
        qty = int(payload["qty"])
        if qty > world.stock:
            raise BusinessFailure("out of stock")
        world.stock -= qty
        world.reservations[ctx.saga_id] = qty
        world.applied.append((ctx.saga_id, "reserve"))
        return {"reservation": f"r-{ctx.saga_id[:8]}"}

    @store.compensation("release")
    @stock.compensation("release")
    def release(_: Any, payload: Payload, ctx: Context) -> None:
        world.stock += world.reservations.pop(ctx.saga_id)
        world.applied.append((ctx.saga_id, "release"))

    @store.command("charge", compensation="refund")
    @bank.command("charge", compensation="refund")
    def charge(_: Any, payload: Payload, ctx: Context) -> dict[str, Any]:
        customer, amount = str(payload["customer"]), int(payload["amount"])
        if world.funds[customer] < amount:
            raise BusinessFailure("insufficient funds")
        world.funds[customer] -= amount
        world.charges[ctx.saga_id] = (customer, amount)
        world.applied.append((ctx.saga_id, "charge"))
        return {}

    @store.compensation("refund")
    @bank.compensation("refund")
    def refund(_: Any, payload: Payload, ctx: Context) -> None:
        customer, amount = world.charges.pop(ctx.saga_id)
        world.funds[customer] += amount
        world.applied.append((ctx.saga_id, "refund"))

    return {"stock": stock, "bank": bank, "store": store}


def to_envelope(state: SagaState, command: Command, now: float) -> Envelope:
    return Envelope(
        message_id=command.message_id,
        correlation_id=command.saga_id,
        causation_id=None,
        saga=state.name,
        version=state.version,
        step=command.step,
        attempt=command.attempt,
        kind=command.kind,
        type=command.type,
        payload=command.payload,
        reply_to=DEFAULT_REPLY_QUEUE,
        sent_at=now,
        slip=command.slip,
    )


class SystemModel(RuleBasedStateMachine):
    definition = SHOP

    @initialize(seed=st.integers(0, 2**32 - 1))
    def setup(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.sagas: dict[str, SagaState] = {}
        self.reply_inbox: set[str] = set()
        self.network: list[Envelope] = []
        self.services = Services()
        self.participants = build_participants(self.services)
        self.inboxes = {name: MemoryInbox() for name in self.participants}
        # Commands a participant sent down a routing slip, or handled itself (none
        # without one).
        self.forwarded = 0

    # -- the orchestrator's side -------------------------------------------------

    def _emit(self, state: SagaState, commands: tuple[Command, ...]) -> None:
        self.network.extend(to_envelope(state, c, self.now) for c in commands)

    @precondition(lambda self: len(self.sagas) < 6)
    @rule(
        customer=st.sampled_from(sorted(FUNDS)), qty=st.integers(1, 6), amount=st.integers(10, 300)
    )
    def start_saga(self, customer: str, qty: int, amount: int) -> None:
        saga_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        t = start(
            self.definition, saga_id, {"customer": customer, "qty": qty, "amount": amount}, self.now
        )
        self.sagas[saga_id] = t.state
        self._emit(t.state, t.commands)

    def _apply_reply(self, reply: Envelope) -> None:
        if reply.message_id in self.reply_inbox:
            return  # the reply inbox absorbs it
        self.reply_inbox.add(reply.message_id)
        state = self.sagas[reply.correlation_id]
        t = transition(self.definition, state, event_from_reply(reply), self.now)
        self.sagas[reply.correlation_id] = t.state
        self._emit(t.state, t.commands)

    @precondition(lambda self: bool(self.sagas))
    @rule(
        pick=st.integers(0, 10_000),
        step=st.sampled_from(["reserve", "charge", "no_such_step"]),
        type_=st.sampled_from(["succeeded", "failed", "error", "compensated", "cancelled"]),
        attempt=st.integers(1, 9),
        garbage=st.binary(max_size=64),
    )
    def a_bad_message_arrives(
        self, pick: int, step: str, type_: str, attempt: int, garbage: bytes
    ) -> None:
        """Garbage never gets past the decoder; a well-formed reply that fits no attempt
        (unknown step, attempt never sent, no result) changes nothing it should not."""
        with contextlib.suppress(MessageError):
            decode(garbage)
            raise AssertionError("garbage decoded")
        saga_id = sorted(self.sagas)[pick % len(self.sagas)]
        state = self.sagas[saga_id]
        current = state.steps.get(step)
        sent = (
            0
            if current is None
            else (current.comp_attempt if type_ == "compensated" else current.attempt)
        )
        if attempt <= sent:
            return  # a legitimate reply to an attempt that was sent: not a bad message
        bogus = Envelope(
            message_id=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            correlation_id=saga_id,
            causation_id=None,
            saga=self.definition.name,
            version=self.definition.version,
            step=step,
            attempt=attempt,
            kind="reply",
            type=type_,
            payload={},
        )
        t = transition(self.definition, state, event_from_reply(bogus), self.now)
        assert not t.changed and not t.commands, f"a bogus reply moved the saga: {t.note}"

    @rule(jump=st.floats(0.1, 8.0))
    def clock_jumps_and_timers_fire(self, jump: float) -> None:
        self.now += jump
        for saga_id, state in list(self.sagas.items()):
            wake = state.wake_at
            if wake is not None and wake <= self.now:
                t = transition(self.definition, state, TimersDue(), self.now)
                self.sagas[saga_id] = t.state
                self._emit(t.state, t.commands)

    # -- the network ------------------------------------------------------------

    def _deliver(self, index: int, *, crash_before_ack: bool) -> None:
        message = self.network[index]
        if not crash_before_ack:
            self.network.pop(index)
        # A crash after the commit and before the ack: the work is done and the
        # message comes back (it stays in the network).
        if message.kind == "reply":
            self._apply_reply(message)
        else:
            participant = self.participants[self.definition.step(message.step).participant]
            inbox = self.inboxes[participant.name]
            before = len(inbox.sent)
            participant.handle(None, message, inbox=inbox)  # type: ignore[arg-type]
            sent = [out for _, out in inbox.sent[before:]]
            # A reply carrying the results of earlier steps followed a forward.
            self.forwarded += sum(
                out.kind == "command" or (out.slip is not None and bool(out.slip.results))
                for out in sent
            )
            self.network.extend(sent)

    @precondition(lambda self: bool(self.network))
    @rule(pick=st.integers(0, 10_000))
    def deliver(self, pick: int) -> None:
        self._deliver(pick % len(self.network), crash_before_ack=False)

    @precondition(lambda self: bool(self.network))
    @rule(pick=st.integers(0, 10_000))
    def crash_between_commit_and_ack(self, pick: int) -> None:
        self._deliver(pick % len(self.network), crash_before_ack=True)

    @precondition(lambda self: bool(self.network))
    @rule(pick=st.integers(0, 10_000))
    def duplicate(self, pick: int) -> None:
        self.network.append(self.network[pick % len(self.network)])

    @precondition(lambda self: bool(self.network))
    @rule(pick=st.integers(0, 10_000))
    def reorder(self, pick: int) -> None:
        self.network.append(self.network.pop(pick % len(self.network)))

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def stock_and_money_are_conserved(self) -> None:
        s = self.services
        assert s.stock + sum(s.reservations.values()) == STOCK
        charged: dict[str, int] = dict.fromkeys(FUNDS, 0)
        for customer, amount in s.charges.values():
            charged[customer] += amount
        assert all(s.funds[c] + charged[c] == FUNDS[c] for c in FUNDS)
        assert all(v >= 0 for v in s.funds.values()) and s.stock >= 0

    @invariant()
    def no_effect_is_applied_twice(self) -> None:
        applied = self.services.applied
        assert len(applied) == len(set(applied)), "an effect was applied twice"

    @invariant()
    def running_sagas_always_have_a_timer(self) -> None:
        for state in self.sagas.values():
            if state.status not in SETTLED:
                assert state.wake_at is not None, "a running saga could be forgotten"

    def teardown(self) -> None:
        if not hasattr(self, "sagas"):
            return
        for _ in range(5_000):
            if self.network:
                self._deliver(0, crash_before_ack=False)
            elif any(s.status not in SETTLED for s in self.sagas.values()):
                self.clock_jumps_and_timers_fire(5.0)
            else:
                break
        assert not self.network
        completed = any(s.status is SagaStatus.COMPLETED for s in self.sagas.values())
        if not self.definition.routing_slip:
            assert self.forwarded == 0
        elif completed:
            assert self.forwarded > 0, "a saga completed on a slip nobody forwarded"
        for saga_id, state in self.sagas.items():
            assert state.status in SETTLED
            effects = {what for sid, what in self.services.applied if sid == saga_id}
            held = saga_id in self.services.reservations or saga_id in self.services.charges
            if state.status is SagaStatus.COMPLETED:
                assert {"reserve", "charge"} <= effects and held
            elif state.status is SagaStatus.COMPENSATED:
                assert not held, f"compensated saga {saga_id} still holds {effects}"


class SlipSystemModel(SystemModel):
    """The same world, the saga on a routing slip."""

    definition = SHOP_SLIP


class LocalSlipSystemModel(SystemModel):
    """Both steps on one service: the slip's next step is handled where it is."""

    definition = SHOP_LOCAL


SystemModel.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
SlipSystemModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None
)
LocalSlipSystemModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None
)
test_the_system_model = SystemModel.TestCase
test_the_system_model_on_a_routing_slip = SlipSystemModel.TestCase
test_the_system_model_with_a_slip_handled_in_one_service = LocalSlipSystemModel.TestCase
