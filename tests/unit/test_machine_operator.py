"""Hypothesis: operator actions in the hostile world of test_machine_properties.

An operator acts at random moments (retry, skip, abort, resume, on any step, some
without an actor or with a result missing its fields). Whatever happens:
- a refused action changes nothing and emits nothing;
- a parked saga emits nothing, and moves only when an operator acts;
- replaying the recorded events (operator actions serialised and read back)
  reproduces the state;
- compensations still run one pass, in reverse order, and the participants' effects
  match how the saga ended (an operator's skip counts as done by hand).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import Parallel, Registry, Retry, Saga, Step, result
from orchestrator.events import (
    OperatorEvent,
    SagaAborted,
    SagaResumed,
    Started,
    StepRetried,
    StepSkipped,
    TimersDue,
    event_from_dict,
)
from orchestrator.machine import Command, operator_refusal, start, transition
from orchestrator.state import SETTLED, SagaState, SagaStatus, StepStatus
from tests.sagas import ORDER
from tests.unit.test_machine_properties import (
    ACTIONS,
    BEHAVIOURS,
    FANOUT,
    INPUTS,
    SAGA_ID,
    SIMPLE,
    Participant,
    World,
    _check_compensation_order,
    _check_effects,
)

ONCE = Retry(max_attempts=1, on_exhausted="park")
TWICE = Retry(max_attempts=2, initial=1.0, on_exhausted="park")

# Parks easily, before and after its pivot, forward and backward.
PARKY = Saga(
    "parky",
    version=1,
    input={},
    steps=[
        Step(
            "a",
            "p1",
            "do_a",
            compensation="undo_a",
            result=("id",),
            timeout=5,
            retry=ONCE,
            compensation_retry=ONCE,
        ),
        Parallel(
            Step("b", "p2", "do_b", compensation="undo_b", timeout=5, retry=TWICE),
            Step("c", "p3", "do_c", compensation="undo_c", timeout=5, compensation_retry=ONCE),
        ),
        Step("piv", "p4", "do_piv", pivot=True, timeout=5),
        Parallel(
            Step("x", "p5", "do_x", result=("t",), timeout=5, retry=TWICE),
            Step("y", "p6", "do_y", timeout=5, retry=TWICE),
        ),
    ],
)
# Parks down routing slips: a run of three before the pivot, a run of two after it.
SLIPPY = Saga(
    "slippy",
    version=1,
    input={},
    routing_slip=True,
    steps=[
        PARKY.flat_steps[0],  # a: parks at once, forward and backward
        Step(
            "b",
            "p2",
            "do_b",
            compensation="undo_b",
            payload={"id": result("a", "id")},
            timeout=5,
            retry=TWICE,
        ),
        Step("c", "p3", "do_c", compensation="undo_c", timeout=5, compensation_retry=ONCE),
        Step("piv", "p4", "do_piv", pivot=True, timeout=5),
        Step("x", "p5", "do_x", result=("t",), timeout=5, retry=TWICE),
        Step("y", "p6", "do_y", timeout=5, retry=TWICE),
    ],
)
Registry([PARKY, SLIPPY])
INPUTS = {**INPUTS, "parky": {}, "slippy": {}}


def operator_event(draw: st.DataObject, definition: Saga, state: SagaState) -> OperatorEvent:
    kind = draw.draw(st.sampled_from(["retry", "skip", "abort", "resume"]))
    actor = draw.draw(st.sampled_from(["ops", "ops", "ops", ""]))
    common = {"actor": actor, "reason": "hypothesis"}
    if kind == "abort":
        return SagaAborted(**common)
    if kind == "resume":
        return SagaResumed(**common)
    names = [s.name for s in definition.flat_steps]
    parked = [parked_step] * 4 if (parked_step := state.parked_step) else []
    step = draw.draw(st.sampled_from([*parked, *names, "nope"]))
    if kind == "retry":
        return StepRetried(step, **common)
    fields = definition.step(step).result if step in names else ()
    complete = draw.draw(st.booleans())
    result = {f: f"{step}-{f}-by-hand" for f in fields} if complete else None
    return StepSkipped(step, result, **common)


def operate(world: World, event: OperatorEvent) -> None:
    before = world.state
    refusal = operator_refusal(world.definition, before, event)
    t = transition(world.definition, before, event, world.now)
    if refusal:
        assert not t.changed and not t.commands and t.state is before, "a refusal changes nothing"
        assert t.note == f"refused: {refusal}"
        return
    assert t.changed
    if t.state.status is SagaStatus.FAILED:
        assert not t.commands, "a parked saga never emits commands"
    world.record.append((event, world.now))
    world.state = t.state
    if isinstance(event, StepSkipped):
        # The operator did it by hand: the participant's world agrees.
        memory = world.participants.setdefault(event.step, Participant())
        if t.state.steps[event.step].status is StepStatus.COMPENSATED:
            memory.compensated = True
        else:
            memory.outcome = "succeeded"
    world.send(t.commands)
    world.settled_as = world.state.status if world.state.status in SETTLED else None


def deliver(world: World, message: Command | object, behaviour: str) -> None:
    if isinstance(message, Command):
        reply = world.participant_handles(message, behaviour)
        if reply is not None:
            world.network.append(reply)
        return
    parked = world.state.status is SagaStatus.FAILED
    revision = world.state
    world.apply(message)  # type: ignore[arg-type]
    if parked:
        assert world.state is revision, "a parked saga moves only when an operator acts"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([ORDER, SIMPLE, FANOUT, PARKY, PARKY, SLIPPY, SLIPPY]))
def test_operator_actions_keep_the_saga_consistent_and_replayable(
    draw: st.DataObject, definition: Saga
) -> None:
    t = start(definition, SAGA_ID, INPUTS[definition.name], 0.0)
    world = World(definition, t.state)
    world.record.append((Started(data=INPUTS[definition.name]), 0.0))
    world.send(t.commands)

    for _ in range(draw.draw(st.integers(0, 80), label="chaos steps")):
        action = draw.draw(st.sampled_from([*ACTIONS, "operator", "operator"]))
        if action == "operator":
            operate(world, operator_event(draw, definition, world.state))
            continue
        if action == "tick":
            world.now += draw.draw(st.floats(0.1, 40.0))
            deliver(world, TimersDue(), "")
            continue
        if not world.network:
            continue
        index = draw.draw(st.integers(0, len(world.network) - 1))
        if action == "reorder":
            world.network.append(world.network.pop(index))
            continue
        message = world.network[index] if action == "duplicate" else world.network.pop(index)
        if action != "drop":
            deliver(world, message, draw.draw(st.sampled_from(BEHAVIOURS)))

    # The world turns kind; a parked saga gets an operator who resumes, retries,
    # and, when the participant keeps refusing, does the step by hand.
    for round_ in range(3000):
        if world.state.status in SETTLED and not world.network:
            if world.state.status is not SagaStatus.FAILED or round_ > 2000:
                break
            operate(world, _unstick(world))
            continue
        if world.network:
            deliver(world, world.network.pop(0), "succeeded")
        else:
            wake = world.state.wake_at
            assert wake is not None, f"{world.state.status} saga with nothing in flight"
            world.now = max(world.now, wake)
            deliver(world, TimersDue(), "")
    assert world.state.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)

    _check_effects(world)
    _check_compensation_order(world)
    ids = [c.message_id for c in world.emitted]
    assert len(ids) == len(set(ids)), "a command was emitted twice for the same step attempt"
    _check_replay_through_json(world)


def _unstick(world: World) -> OperatorEvent:
    state = world.state
    resume = SagaResumed(actor="ops", reason="kind world")
    if not operator_refusal(world.definition, state, resume):
        return resume
    parked = state.steps[state.parked_step or ""]
    # A participant that refused keeps refusing (it dedups by saga + step): retrying
    # is pointless, the operator does it by hand.
    if parked.status is not StepStatus.REJECTED:
        return StepRetried(state.parked_step or "", actor="ops", reason="kind world")
    step = world.definition.step(state.parked_step or "")
    result = {f: f"{step.name}-{f}-by-hand" for f in step.result}
    return StepSkipped(step.name, result, actor="ops", reason="kind world")


def _check_replay_through_json(world: World) -> None:
    (first, at), *rest = world.record
    assert isinstance(first, Started)
    state = start(world.definition, SAGA_ID, first.data, at).state
    for event, now in rest:
        stored = event_from_dict(event.to_dict())
        assert stored == event
        state = transition(world.definition, state, stored, now).state
    assert state == world.state
    assert SagaState.from_dict(world.state.to_dict()) == world.state
