"""The pure saga state machine: (definition, state, event, now) -> Transition.

No I/O and no clock of its own: the caller hands it ``now`` (epoch seconds). The
same inputs always give the same output, which is what lets the engine replay a
saga's history and lets hypothesis explore event orders (tests/unit).

Rules in brief (docs/sagas.md has the long form):
- Stages run in order; the steps of a Parallel stage are dispatched together and
  the saga moves on when all of them succeeded.
- A success or business-failure reply to ANY attempt of a step in flight decides
  the step (participants dedup by saga + step, so every attempt gets the same
  answer). Technical errors count only for the current attempt; others are stale.
- A business failure before the pivot starts backward recovery; after the pivot
  it parks the saga. An attempt that errors or times out is retried by the step's
  Retry; when retries run out, the step is ``abandoned`` (its effect is unknown)
  and the saga compensates or parks, as the policy says.
- Backward recovery compensates, one at a time in reverse order, every step that
  succeeded or was abandoned and has a compensation. Steps still in flight are
  abandoned too: their compensation may overtake their command, which the
  participant handles (cancel-before-do). Late replies are then ignored.
- A compensation that fails is retried by its own policy; when that runs out the
  saga is parked (status ``failed``) for an operator.
- Settled sagas (completed, compensated, failed) ignore every reply and timer, so
  a parked saga never emits a command until an operator acts.

Operator actions are events too (``OperatorEvent``), so the history replays them:
- retry: a new attempt of the parked step, or of its compensation; the saga goes
  back to where it was parked from (running or compensating), and the other
  unfinished steps of the current stage are sent again (new attempts).
- skip: the step is done by hand: a forward step succeeds with the operator's
  result (which must hold the declared result fields), a compensation counts as
  compensated; then the saga goes on.
- abort: backward recovery of a running saga, or of one parked before its pivot
  passed; refused once the pivot succeeded, while it is in flight, or when the
  saga already compensates or has ended.
- resume: a parked saga goes on where it stopped: the unfinished steps of the
  current stage get a new attempt, or the stopped (or next) compensation is sent.
An action that does not fit the saga's state is refused: the transition is
unchanged and its note starts with ``refused:`` (the engine raises on it).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Literal

from orchestrator.definition import Retry, Saga, Step, render
from orchestrator.events import (
    CompensationFailed,
    CompensationSucceeded,
    Event,
    OperatorEvent,
    SagaAborted,
    SagaResumed,
    Started,
    StepCancelled,
    StepErrored,
    StepEvent,
    StepFailed,
    StepRetried,
    StepSkipped,
    StepSucceeded,
    TimersDue,
)
from orchestrator.state import (
    COMPENSATION_IN_PROGRESS,
    FORWARD_IN_PROGRESS,
    NEEDS_COMPENSATION,
    SETTLED,
    SagaState,
    SagaStatus,
    StepState,
    StepStatus,
    Timer,
)
from outbox_relay.message import Slip, SlipStep

CommandKind = Literal["command", "compensation"]


@dataclass(frozen=True, slots=True)
class Command:
    """A message the saga sends to a participant; its id is fixed by what it is."""

    saga_id: str
    step: str
    attempt: int
    kind: CommandKind
    participant: str
    type: str
    payload: Mapping[str, Any]
    # The routing slip: the commands its participant forwards once this one succeeded.
    slip: Slip | None = None

    @property
    def message_id(self) -> str:
        return command_id(self.saga_id, self.step, self.kind, self.attempt)


@lru_cache(maxsize=1024)
def command_id(saga_id: str, step: str, kind: str, attempt: int) -> str:
    """Deterministic: re-deciding the same transition never mints a second message."""
    # Cached: a command's id is read for its envelope, its outbox row and its history
    # row, and a SHA-1 each time cost more than the lookup.
    return str(uuid.uuid5(uuid.UUID(saga_id), f"{step}/{kind}/{attempt}"))


@dataclass(frozen=True, slots=True)
class Transition:
    state: SagaState
    commands: tuple[Command, ...] = ()
    # False when the event was ignored (duplicate, stale, or the saga is settled).
    changed: bool = True
    note: str = ""

    @property
    def timers(self) -> tuple[Timer, ...]:
        return self.state.timers


def start(definition: Saga, saga_id: str, data: Mapping[str, Any], now: float) -> Transition:
    """The first transition of a new saga: dispatch its first stage."""
    state = SagaState(
        saga_id=saga_id,
        name=definition.name,
        version=definition.version,
        status=SagaStatus.RUNNING,
        data=dict(data),
        steps={step.name: StepState() for step in definition.flat_steps},
    )
    decision = _Decision(definition, state, now)
    decision.advance()
    return decision.done("started")


def transition(definition: Saga, state: SagaState, event: Event, now: float) -> Transition:
    """Apply one event. Never raises for an event that does not fit: it is ignored."""
    if (definition.name, definition.version) != (state.name, state.version):
        raise ValueError(
            f"definition {definition.name} v{definition.version} does not match "
            f"saga {state.name} v{state.version}"
        )
    if isinstance(event, OperatorEvent):
        return _operate(definition, state, event, now)
    if state.status in SETTLED:
        return Transition(state, changed=False, note=f"ignored: saga is {state.status}")
    if isinstance(event, Started):
        return Transition(state, changed=False, note="ignored: saga already started")
    if isinstance(event, TimersDue):
        return _on_timers(definition, state, now)
    if not isinstance(event, StepEvent):
        return Transition(state, changed=False, note=f"ignored: unknown event {event.type}")
    if event.step not in state.steps:
        return Transition(state, changed=False, note=f"ignored: no step {event.step!r}")
    d = _Decision(definition, state, now)
    if isinstance(event, StepSucceeded):
        return d.step_succeeded(event)
    if isinstance(event, StepFailed | StepCancelled):
        return d.step_rejected(event, event.reason)
    if isinstance(event, StepErrored):
        return d.step_errored(event)
    if isinstance(event, CompensationSucceeded):
        return d.compensation_succeeded(event)
    if isinstance(event, CompensationFailed):
        return d.compensation_failed(event)
    return Transition(state, changed=False, note=f"ignored: unknown event {event.type}")


def backoff(policy: Retry, saga_id: str, step: str, attempt: int) -> float:
    """Delay before the attempt after ``attempt``, with deterministic jitter."""
    base = min(policy.maximum, policy.initial * policy.multiplier ** (attempt - 1))
    if not policy.jitter or not base:
        return base
    digest = hashlib.blake2b(f"{saga_id}/{step}/{attempt}".encode(), digest_size=8).digest()
    unit = int.from_bytes(digest, "big") / 2**64
    return max(0.0, base * (1 + policy.jitter * (2 * unit - 1)))


def _on_timers(definition: Saga, state: SagaState, now: float) -> Transition:
    d = _Decision(definition, state, now)
    fired = []
    # One pass in definition order; each handler may change the saga's status
    # (start compensating, park), which the following ones must see.
    for name in list(state.steps):
        current = d.state.steps[name]
        if d.state.status in SETTLED:
            break
        if current.due is None or current.due > now:
            continue
        fired.append(name)
        step = definition.step(name)
        if current.status is StepStatus.ACTIVE:
            d.attempt_failed(step, f"no reply within {step.timeout:g}s (attempt {current.attempt})")
        elif current.status is StepStatus.RETRYING:
            d.dispatch(step, current.attempt + 1)
        elif current.status is StepStatus.COMPENSATING:
            d.compensation_attempt_failed(
                step,
                f"no reply to compensation within {step.compensation_timeout:g}s "
                f"(attempt {current.comp_attempt})",
            )
        elif current.status is StepStatus.COMPENSATION_RETRYING:
            d.send_compensation(step, current.comp_attempt + 1)
    if not fired:
        return Transition(state, changed=False, note="ignored: nothing due")
    return d.done("timers fired: " + ", ".join(fired))


def operator_refusal(definition: Saga, state: SagaState, event: OperatorEvent) -> str:
    """Why this operator action does not fit the saga's state; '' when it does."""
    if not event.actor.strip():
        return "an operator action needs an actor (who)"
    if not event.reason.strip():
        return "an operator action needs a reason (why)"
    if isinstance(event, SagaAborted):
        return _abort_refusal(definition, state)
    if state.status is not SagaStatus.FAILED:
        return f"saga is {state.status}, not parked (failed)"
    backward = state.parked_from is SagaStatus.COMPENSATING
    if isinstance(event, SagaResumed):
        if backward:
            return ""
        refused = [
            s.name
            for s in current_stage(definition, state)
            if state.steps[s.name].status is StepStatus.REJECTED
        ]
        if refused:
            return (
                f"step {refused[0]} was refused by its participant: retry or skip it"
                " (or abort, before the pivot)"
            )
        return ""
    if not isinstance(event, StepRetried | StepSkipped):
        return f"unknown operator action {event.type}"
    if event.step not in state.steps:
        return f"saga has no step {event.step!r}"
    if isinstance(event, StepRetried) or backward:
        if event.step != state.parked_step:
            return f"step {event.step} is not the parked step ({state.parked_step})"
        if isinstance(event, StepSkipped) and event.result is not None:
            return "a skipped compensation takes no result"
        return ""
    stage = [s.name for s in current_stage(definition, state)]
    if event.step not in stage or state.steps[event.step].status is StepStatus.SUCCEEDED:
        return f"step {event.step} is not an unfinished step of the current stage {stage}"
    result = {} if event.result is None else event.result
    missing = _missing_result_fields(definition.step(event.step), result)
    return f"the result given for {event.step}: {missing}" if missing else ""


def _abort_refusal(definition: Saga, state: SagaState) -> str:
    if state.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED):
        return f"saga is {state.status}"
    if SagaStatus.COMPENSATING in (state.status, state.parked_from):
        return "saga is already compensating"
    pivot = definition.pivot_stage
    if pivot is None:
        return ""
    statuses = {s.name: state.steps[s.name].status for s in definition.stages[pivot]}
    if all(s is StepStatus.SUCCEEDED for s in statuses.values()):
        return "its pivot has passed: the saga only goes forward"
    in_flight = [n for n, s in statuses.items() if s in FORWARD_IN_PROGRESS]
    if in_flight and state.status is SagaStatus.RUNNING:
        # The pivot has no compensation: undoing around it needs its outcome.
        return f"its pivot {in_flight[0]} is in flight: wait for its outcome"
    return ""


def current_stage(definition: Saga, state: SagaState) -> tuple[Step, ...]:
    """The first stage not fully succeeded; () when every stage succeeded."""
    for stage in definition.stages:
        if any(state.steps[s.name].status is not StepStatus.SUCCEEDED for s in stage):
            return stage
    return ()


def _operate(definition: Saga, state: SagaState, event: OperatorEvent, now: float) -> Transition:
    problem = operator_refusal(definition, state, event)
    if problem:
        return Transition(state, changed=False, note=f"refused: {problem}")
    d = _Decision(definition, state, now)
    by = f"by {event.actor}: {event.reason}"
    if isinstance(event, SagaAborted):
        d.compensate(f"aborted {by}")
        return d.done(f"saga aborted {by}")
    d.unpark()
    backward = d.state.status is SagaStatus.COMPENSATING
    if isinstance(event, StepRetried):
        note = f"step {event.step} retried {by}"
        if backward:
            step = definition.step(event.step)
            d.send_compensation(step, d.state.steps[step.name].comp_attempt + 1)
        else:
            d.continue_forward()
    elif isinstance(event, StepSkipped):
        note = f"step {event.step} skipped {by}"
        d.skip(event.step, event.result, f"skipped {by}")
    else:
        note = f"saga resumed {by}"
        if backward:
            d.continue_backward()
        else:
            d.continue_forward()
    return d.done(note)


@dataclass
class _Decision:
    """Accumulates one transition: the evolving state and the commands to send."""

    definition: Saga
    state: SagaState
    now: float
    commands: list[Command] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def done(self, note: str = "") -> Transition:
        text = "; ".join(n for n in (note, *self.notes) if n)
        # A transition that parks the saga sends nothing: an operator decides next.
        commands = () if self.state.status is SagaStatus.FAILED else tuple(self.commands)
        return Transition(self.state, commands, True, text)

    def ignored(self, why: str) -> Transition:
        return Transition(self.state, changed=False, note=f"ignored: {why}")

    # -- forward -----------------------------------------------------------------

    def step_succeeded(self, event: StepSucceeded) -> Transition:
        current = self.state.steps[event.step]
        if not self._decides(current, event):
            return self.ignored(f"late or duplicate success of {event.step}")
        self._slip_results(event)
        step = self.definition.step(event.step)
        missing = _missing_result_fields(step, event.result)
        if missing:
            if current.status is StepStatus.ACTIVE and event.attempt == current.attempt:
                self.attempt_failed(step, missing)
                return self.done(f"step {step.name} replied without its result")
            return self.ignored(f"stale malformed success of {event.step}")
        self._set(step.name, status=StepStatus.SUCCEEDED, result=dict(event.result), due=None)
        self.advance()
        return self.done(f"step {step.name} succeeded")

    def step_rejected(self, event: StepEvent, reason: str) -> Transition:
        current = self.state.steps[event.step]
        if not self._decides(current, event):
            return self.ignored(f"late or duplicate failure of {event.step}")
        self._slip_results(event)
        self._set(event.step, status=StepStatus.REJECTED, reason=reason, due=None)
        # A refused step never forwarded its slip: the steps after it were not sent.
        for follower in self.definition.slips.get(event.step, ()):
            after = self.state.steps[follower.name]
            if after.status is StepStatus.ACTIVE and after.due is None:
                self._set(follower.name, status=StepStatus.PENDING)
        if self._pivot_passed():
            self.park(event.step, f"step {event.step} failed after the pivot: {reason}")
        else:
            self.compensate(f"step {event.step} failed: {reason}")
        return self.done()

    def step_errored(self, event: StepErrored) -> Transition:
        current = self.state.steps[event.step]
        if not (
            self.state.status is SagaStatus.RUNNING
            and current.status is StepStatus.ACTIVE
            and event.attempt == current.attempt
        ):
            return self.ignored(f"stale error of {event.step} attempt {event.attempt}")
        self._slip_results(event)
        self.attempt_failed(self.definition.step(event.step), event.reason)
        return self.done()

    def _slip_results(self, event: StepEvent) -> None:
        """The steps of a routing slip that succeeded before the one replying."""
        for name, result in (event.slip_results or {}).items():
            current = self.state.steps.get(name)
            if current is None or current.status not in FORWARD_IN_PROGRESS:
                continue
            if _missing_result_fields(self.definition.step(name), result):
                # A participant forwards only with the declared fields: not from a slip.
                continue
            self._set(name, status=StepStatus.SUCCEEDED, result=dict(result), due=None)
            self.notes.append(f"step {name} succeeded (routing slip)")

    def _decides(self, current: StepState, event: StepEvent) -> bool:
        return (
            self.state.status is SagaStatus.RUNNING
            and current.status in FORWARD_IN_PROGRESS
            and 1 <= event.attempt <= current.attempt
        )

    def attempt_failed(self, step: Step, reason: str) -> None:
        attempt = self.state.steps[step.name].attempt
        policy = step.retry
        if policy.max_attempts is None or attempt < policy.max_attempts:
            delay = backoff(policy, self.state.saga_id, step.name, attempt)
            if delay <= 0:
                self.dispatch(step, attempt + 1)
            else:
                self._set(
                    step.name, status=StepStatus.RETRYING, due=self.now + delay, reason=reason
                )
            self.notes.append(f"step {step.name} attempt {attempt} failed: {reason}")
            return
        self._set(step.name, status=StepStatus.ABANDONED, due=None, reason=reason)
        why = f"step {step.name} gave up after {attempt} attempt(s): {reason}"
        if policy.on_exhausted == "park" or self._pivot_passed():
            self.park(step.name, why)
        else:
            self.compensate(why)

    def advance(self) -> None:
        """Dispatch the first stage that has not fully succeeded, or complete."""
        for stage in self.definition.stages:
            statuses = [self.state.steps[s.name].status for s in stage]
            if all(s is StepStatus.SUCCEEDED for s in statuses):
                continue
            for step in stage:
                current = self.state.steps[step.name]
                if current.status is StepStatus.PENDING:
                    self.dispatch(step, 1)
                elif current.status is StepStatus.ACTIVE and current.due is None:
                    # Sent down a routing slip whose earlier steps are all decided, so no
                    # deadline covers it any more (a participant replied instead of
                    # forwarding): the orchestrator sends it itself.
                    self.dispatch(step, current.attempt + 1)
                if self.state.status is not SagaStatus.RUNNING:
                    return
            return
        self.state = replace(self.state, status=SagaStatus.COMPLETED)
        self.notes.append("saga completed")

    def dispatch(self, step: Step, attempt: int) -> None:
        followers = self.definition.slips.get(step.name, ())
        try:
            payload = render(step.payload, self.state.data, self.state.results)
            later = frozenset(s.name for s in (step, *followers))
            payloads = [
                render(f.payload, self.state.data, self.state.results, later) for f in followers
            ]
        except (KeyError, IndexError, TypeError) as e:
            self.park(step.name, f"cannot build the payload of step {step.name}: {e!r}")
            return
        # The head of a slip answers for the whole run: its deadline covers every step.
        due = self.now + self.definition.deadline_of(step.name)
        self._set(step.name, status=StepStatus.ACTIVE, attempt=attempt, due=due)
        slip = None
        if followers:
            forwarded = []
            for follower, follower_payload in zip(followers, payloads, strict=True):
                n = self.state.steps[follower.name].attempt + 1
                # In flight down the slip: no deadline of its own, the head's covers it.
                self._set(follower.name, status=StepStatus.ACTIVE, attempt=n, due=None)
                forwarded.append(
                    SlipStep(
                        step=follower.name,
                        participant=follower.participant,
                        type=follower.command,
                        attempt=n,
                        message_id=command_id(self.state.saga_id, follower.name, "command", n),
                        payload=follower_payload,
                        result=follower.result,
                    )
                )
            slip = Slip(result=step.result, next=tuple(forwarded))
        self.commands.append(
            Command(
                self.state.saga_id,
                step.name,
                attempt,
                "command",
                step.participant,
                step.command,
                payload,
                slip,
            )
        )

    def _pivot_passed(self) -> bool:
        pivot = self.definition.pivot_stage
        if pivot is None:
            return False
        return all(
            self.state.steps[s.name].status is StepStatus.SUCCEEDED
            for s in self.definition.stages[pivot]
        )

    # -- backward ----------------------------------------------------------------

    def compensate(self, reason: str) -> None:
        """Start backward recovery: abandon what is in flight, undo in reverse order."""
        steps = dict(self.state.steps)
        for name, current in steps.items():
            if current.status in FORWARD_IN_PROGRESS:
                steps[name] = replace(current, status=StepStatus.ABANDONED, due=None)
        self.state = replace(self.state, status=SagaStatus.COMPENSATING, steps=steps, reason=reason)
        # Attempts decided earlier in this same transition are abandoned too: don't send them.
        self.commands = [c for c in self.commands if c.kind == "compensation"]
        self.notes.append(f"compensating: {reason}")
        self.compensate_next()

    def compensate_next(self) -> None:
        for step in reversed(self.definition.flat_steps):
            current = self.state.steps[step.name]
            if step.compensation is not None and current.status in NEEDS_COMPENSATION:
                self.send_compensation(step, 1)
                return
        self.state = replace(self.state, status=SagaStatus.COMPENSATED)
        self.notes.append("saga compensated")

    def send_compensation(self, step: Step, attempt: int) -> None:
        assert step.compensation is not None
        try:
            payload = render(step.compensation_payload, self.state.data, self.state.results)
        except (KeyError, IndexError, TypeError) as e:
            self.park(step.name, f"cannot build the compensation payload of {step.name}: {e!r}")
            return
        self._set(
            step.name,
            status=StepStatus.COMPENSATING,
            comp_attempt=attempt,
            due=self.now + step.compensation_timeout,
        )
        self.commands.append(
            Command(
                self.state.saga_id,
                step.name,
                attempt,
                "compensation",
                step.participant,
                step.compensation,
                payload,
            )
        )

    def compensation_succeeded(self, event: CompensationSucceeded) -> Transition:
        current = self.state.steps[event.step]
        if not (
            self.state.status is SagaStatus.COMPENSATING
            and current.status in COMPENSATION_IN_PROGRESS
            and 1 <= event.attempt <= current.comp_attempt
        ):
            return self.ignored(f"late or duplicate compensation reply of {event.step}")
        self._set(event.step, status=StepStatus.COMPENSATED, due=None)
        self.compensate_next()
        return self.done(f"step {event.step} compensated")

    def compensation_failed(self, event: CompensationFailed) -> Transition:
        current = self.state.steps[event.step]
        if not (
            self.state.status is SagaStatus.COMPENSATING
            and current.status is StepStatus.COMPENSATING
            and event.attempt == current.comp_attempt
        ):
            return self.ignored(f"stale compensation failure of {event.step}")
        self.compensation_attempt_failed(self.definition.step(event.step), event.reason)
        return self.done()

    def compensation_attempt_failed(self, step: Step, reason: str) -> None:
        attempt = self.state.steps[step.name].comp_attempt
        policy = step.compensation_retry
        if policy.max_attempts is None or attempt < policy.max_attempts:
            delay = backoff(policy, self.state.saga_id, f"{step.name}/compensation", attempt)
            if delay <= 0:
                self.send_compensation(step, attempt + 1)
            else:
                self._set(
                    step.name,
                    status=StepStatus.COMPENSATION_RETRYING,
                    due=self.now + delay,
                    reason=reason,
                )
            self.notes.append(f"compensation of {step.name} attempt {attempt} failed: {reason}")
            return
        self._set(step.name, status=StepStatus.COMPENSATION_FAILED, due=None, reason=reason)
        self.park(
            step.name, f"compensation of {step.name} gave up after {attempt} attempt(s): {reason}"
        )

    # -- parking -----------------------------------------------------------------

    def park(self, step: str, reason: str) -> None:
        """Stop the saga for an operator: no timer, no command goes out from here."""
        steps = {
            name: replace(s, due=None) if s.due is not None else s
            for name, s in self.state.steps.items()
        }
        self.state = replace(
            self.state,
            status=SagaStatus.FAILED,
            steps=steps,
            reason=reason,
            parked_step=step,
            parked_from=self.state.status,
        )
        self.notes.append(f"parked: {reason}")

    def unpark(self) -> None:
        status = self.state.parked_from or SagaStatus.RUNNING
        # Back to running, the parking reason is history; compensating keeps its cause.
        reason = self.state.reason if status is SagaStatus.COMPENSATING else None
        self.state = replace(
            self.state, status=status, reason=reason, parked_step=None, parked_from=None
        )

    def skip(self, name: str, result: Any, why: str) -> None:
        """The step was done by hand: succeeded with ``result``, or compensated."""
        if self.state.status is SagaStatus.COMPENSATING:
            self._set(name, status=StepStatus.COMPENSATED, due=None, reason=why)
            self.continue_backward()
        else:
            self._set(name, status=StepStatus.SUCCEEDED, result=dict(result or {}), due=None)
            self.continue_forward()

    def continue_forward(self) -> None:
        """Send a new attempt of every unfinished step of the current stage, or advance.

        Attempts in flight when the saga parked lost their timers and maybe their
        replies (a parked saga ignores them), so they are sent again; participants
        dedup by saga + step, so this never applies a step twice.
        """
        stage = current_stage(self.definition, self.state)
        for step in stage:
            current = self.state.steps[step.name]
            if current.status not in (StepStatus.PENDING, StepStatus.SUCCEEDED):
                self.dispatch(step, current.attempt + 1)
                if self.state.status is not SagaStatus.RUNNING:
                    return
        self.advance()

    def continue_backward(self) -> None:
        """Send again the compensation that stopped, else the next one in reverse order."""
        for step in reversed(self.definition.flat_steps):
            current = self.state.steps[step.name]
            stopped = current.status in COMPENSATION_IN_PROGRESS or (
                current.status is StepStatus.COMPENSATION_FAILED
            )
            if stopped:
                self.send_compensation(step, current.comp_attempt + 1)
                return
        self.compensate_next()

    def _set(self, name: str, **changes: Any) -> None:
        self.state = self.state.with_step(name, **changes)


def _missing_result_fields(step: Step, result: Any) -> str:
    if not isinstance(result, Mapping):
        return f"result is {type(result).__name__}, not an object"
    missing = [f for f in step.result if f not in result]
    return f"result lacks declared field(s) {missing}" if missing else ""
