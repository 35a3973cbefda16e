"""Hypothesis explores a saga in a hostile world: participants that succeed, refuse,
error or stay silent; messages duplicated, reordered, dropped; the clock jumping.
Then the world turns kind, and the saga must settle, with its effects consistent."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import Parallel, Registry, Retry, Saga, Step, result
from orchestrator.events import (
    CompensationFailed,
    CompensationSucceeded,
    Event,
    Started,
    StepCancelled,
    StepErrored,
    StepFailed,
    StepSucceeded,
    TimersDue,
)
from orchestrator.machine import Command, start, transition
from orchestrator.state import SETTLED, SagaState, SagaStatus, StepStatus
from outbox_relay.message import Slip
from tests.sagas import ORDER

SIMPLE = Saga(
    "simple",
    version=1,
    input={"x": int},
    steps=[
        Step(
            "a",
            "p1",
            "do_a",
            compensation="undo_a",
            result=("id",),
            timeout=5,
            retry=Retry(max_attempts=2, initial=0.0),
        ),
        Step(
            "b",
            "p2",
            "do_b",
            compensation="undo_b",
            payload={"id": result("a", "id")},
            timeout=5,
            retry=Retry(max_attempts=3, initial=2.0),
        ),
        Step("c", "p3", "check_c", read_only=True, timeout=5),
        Step(
            "d",
            "p4",
            "do_d",
            compensation="undo_d",
            timeout=5,
            compensation_retry=Retry(max_attempts=3, initial=1.0, on_exhausted="park"),
        ),
    ],
)

FANOUT = Saga(
    "fanout",
    version=1,
    input={},
    steps=[
        Step("first", "p1", "do_first", compensation="undo_first", timeout=3),
        Parallel(
            Step(
                "left",
                "p2",
                "do_left",
                compensation="undo_left",
                timeout=3,
                retry=Retry(max_attempts=2, initial=1.0),
            ),
            Step("right", "p3", "do_right", compensation="undo_right", timeout=3),
            Step("mid", "p4", "look_mid", read_only=True, timeout=3),
        ),
        Step("last", "p5", "do_last", compensation="undo_last", timeout=3),
    ],
)

# The same sagas on a routing slip: SIMPLE is one run of four steps, ORDER one of two
# before its pivot.
SIMPLE_SLIP = replace(SIMPLE, version=2, routing_slip=True)
ORDER_SLIP = replace(ORDER, version=2, routing_slip=True)

Registry([ORDER, SIMPLE, FANOUT, SIMPLE_SLIP, ORDER_SLIP])
INPUTS: dict[str, dict[str, Any]] = {
    "order": {"order_id": "o1", "sku": "s", "qty": 1, "amount": 10},
    "simple": {"x": 1},
    "fanout": {},
}


@dataclass
class Participant:
    """One participant's memory of one step: dedup by saga + step, as the SDK does."""

    outcome: str | None = None  # succeeded | failed | cancelled
    compensated: bool = False


@dataclass
class World:
    definition: Saga
    state: SagaState
    now: float = 0.0
    network: list[Command | Event] = field(default_factory=list)
    emitted: list[Command] = field(default_factory=list)
    participants: dict[str, Participant] = field(default_factory=dict)
    record: list[tuple[Event, float]] = field(default_factory=list)
    compensation_order: list[str] = field(default_factory=list)
    settled_as: SagaStatus | None = None

    def apply(self, event: Event) -> None:
        before = self.state
        t = transition(self.definition, before, event, self.now)
        if before.status in SETTLED:
            assert not t.changed and not t.commands, "a settled saga never moves"
        if t.state.status is SagaStatus.FAILED:
            assert not t.commands, "a parked saga never emits commands"
        for c in t.commands:
            self._check_no_second_live_attempt(before, event, c)
        if t.changed:
            self.record.append((event, self.now))
        self.state = t.state
        self.send(t.commands)
        if self.state.status in SETTLED:
            if self.settled_as is not None:
                assert self.state.status is self.settled_as, "exactly one terminal state"
            self.settled_as = self.state.status

    def send(self, commands: tuple[Command, ...]) -> None:
        for c in commands:
            if c.kind == "compensation" and c.attempt == 1:
                self.compensation_order.append(c.step)
        self.emitted.extend(commands)
        self.network.extend(commands)

    def _check_no_second_live_attempt(self, before: SagaState, event: Event, c: Command) -> None:
        if c.kind != "command" or c.attempt == 1:
            return
        prev = before.steps[c.step]
        assert prev.attempt == c.attempt - 1
        if prev.status is StepStatus.ACTIVE:
            ended = (
                isinstance(event, StepErrored | StepSucceeded)
                and event.step == c.step
                and event.attempt == prev.attempt
            ) or (isinstance(event, TimersDue) and prev.due is not None and prev.due <= self.now)
            assert ended, (
                f"attempt {c.attempt} of {c.step} sent while attempt {prev.attempt} was live"
            )

    def participant_handles(self, c: Command, behaviour: str) -> Event | Command | None:
        """What the participant replies, given how it behaves this time (on a routing
        slip, a success forwards the next command instead, as participants.slip does)."""
        memory = self.participants.setdefault(c.step, Participant())
        step = self.definition.step(c.step)
        earlier = dict(c.slip.results) if c.slip is not None and c.slip.results else None
        if c.kind == "command":
            if memory.outcome is None:
                if memory.compensated:
                    memory.outcome = "cancelled"  # cancel-before-do: the tombstone wins
                elif behaviour == "error":
                    return StepErrored(
                        c.step, c.attempt, reason="boom", message_id=_id(), slip_results=earlier
                    )
                elif behaviour == "silent":
                    return None
                else:
                    memory.outcome = behaviour  # succeeded | failed
            if memory.outcome == "succeeded":
                result = {f: f"{c.step}-{f}" for f in step.result}
                if c.slip is not None and c.slip.next:
                    nxt, rest = c.slip.next[0], c.slip.next[1:]
                    return Command(
                        c.saga_id,
                        nxt.step,
                        nxt.attempt,
                        "command",
                        nxt.participant,
                        nxt.type,
                        nxt.payload,
                        Slip(nxt.result, rest, {**c.slip.results, c.step: result}),
                    )
                return StepSucceeded(
                    c.step, c.attempt, result=result, message_id=_id(), slip_results=earlier
                )
            if memory.outcome == "cancelled":
                return StepCancelled(
                    c.step, c.attempt, reason="cancelled", message_id=_id(), slip_results=earlier
                )
            return StepFailed(
                c.step, c.attempt, reason="no", message_id=_id(), slip_results=earlier
            )
        if behaviour == "error" and not memory.compensated:
            return CompensationFailed(c.step, c.attempt, reason="boom", message_id=_id())
        if behaviour == "silent" and not memory.compensated:
            return None
        memory.compensated = True
        return CompensationSucceeded(c.step, c.attempt, message_id=_id())


def _id() -> str:
    return str(uuid.uuid4())


SAGA_ID = "8c1f7a62-5d55-4d0e-9d55-0d5a4c9f2b11"
ACTIONS = ("deliver", "deliver", "deliver", "duplicate", "drop", "tick", "reorder")
BEHAVIOURS = ("succeeded", "succeeded", "succeeded", "failed", "error", "silent")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([ORDER, SIMPLE, FANOUT, SIMPLE_SLIP, ORDER_SLIP]))
def test_a_saga_settles_consistently_whatever_the_world_does(
    draw: st.DataObject, definition: Saga
) -> None:
    t = start(definition, SAGA_ID, INPUTS[definition.name], 0.0)
    world = World(definition, t.state)
    world.record.append((Started(data=INPUTS[definition.name]), 0.0))
    world.send(t.commands)

    for _ in range(draw.draw(st.integers(0, 80), label="chaos steps")):
        action = draw.draw(st.sampled_from(ACTIONS))
        if action == "tick":
            world.now += draw.draw(st.floats(0.1, 40.0))
            world.apply(TimersDue())
            continue
        if not world.network:
            continue
        index = draw.draw(st.integers(0, len(world.network) - 1))
        if action == "reorder":
            world.network.append(world.network.pop(index))
            continue
        message = world.network[index] if action == "duplicate" else world.network.pop(index)
        if action == "drop":
            continue
        if isinstance(message, Command):
            reply = world.participant_handles(message, draw.draw(st.sampled_from(BEHAVIOURS)))
            if reply is not None:
                world.network.append(reply)
        else:
            world.apply(message)

    # The world turns kind: every message arrives, participants succeed, time passes.
    for _ in range(2000):
        if world.state.status in SETTLED and not world.network:
            break
        if world.network:
            message = world.network.pop(0)
            if isinstance(message, Command):
                reply = world.participant_handles(message, "succeeded")
                if reply is not None:
                    world.network.append(reply)
            else:
                world.apply(message)
        else:
            wake = world.state.wake_at
            assert wake is not None, (
                f"{world.state.status} saga with nothing in flight and no timer"
            )
            world.now = max(world.now, wake)
            world.apply(TimersDue())
    assert world.state.status in SETTLED
    assert not world.network

    _check_effects(world)
    _check_compensation_order(world)
    ids = [c.message_id for c in world.emitted]
    assert len(ids) == len(set(ids)), "a command was emitted twice for the same step attempt"
    _check_replay(world)


def _check_effects(world: World) -> None:
    applied = {
        name
        for name, memory in world.participants.items()
        if memory.outcome == "succeeded" and not memory.compensated
    }
    compensable = {s.name for s in world.definition.flat_steps if s.compensation}
    if world.state.status is SagaStatus.COMPLETED:
        assert applied >= compensable, "a completed saga has every effect applied"
        assert not any(m.compensated for m in world.participants.values())
    elif world.state.status is SagaStatus.COMPENSATED:
        assert not (applied & compensable), f"effects left after compensation: {applied}"
    for name, memory in world.participants.items():
        if memory.outcome in ("failed", "cancelled") and memory.compensated:
            # Only a compensation that overtook its command may meet a refused step.
            assert memory.outcome == "cancelled" or world.definition.step(name).compensation


def _check_compensation_order(world: World) -> None:
    order = [s.name for s in world.definition.flat_steps]
    positions = [order.index(name) for name in world.compensation_order]
    assert positions == sorted(positions, reverse=True), "compensations run in reverse order"
    assert len(set(positions)) == len(positions)
    for name in world.compensation_order:
        dispatched = any(
            c.kind == "command"
            and (c.step == name or (c.slip is not None and name in {s.step for s in c.slip.next}))
            for c in world.emitted
        )
        assert dispatched, f"{name} compensated but never dispatched (nor down a slip)"


def _check_replay(world: World) -> None:
    (first, at), *rest = world.record
    assert isinstance(first, Started)
    state = start(world.definition, SAGA_ID, first.data, at).state
    for event, now in rest:
        state = transition(world.definition, state, event, now).state
    assert state == world.state
    assert SagaState.from_dict(world.state.to_dict()) == world.state
