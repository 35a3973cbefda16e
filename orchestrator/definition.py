"""Saga definitions in code: a saga is a name, a version, its input and its steps.

A step's payload is a template: JSON literals with ``data(...)`` and ``result(...)``
references in place of values, so that registration can check that every value a
step needs exists by the time it runs (orchestrator.validation).

    place_order = Saga(
        "place_order", version=1,
        input={"order_id": str, "sku": str, "qty": int, "amount": int},
        steps=[
            Step("reserve", participant="inventory", command="reserve_stock",
                 compensation="release_stock",
                 payload={"sku": data("sku"), "qty": data("qty")},
                 result=("reservation_id",)),
            Step("charge", participant="payment", command="charge_payment", pivot=True,
                 payload={"amount": data("amount")}),
            Parallel(
                Step("ship", participant="shipping", command="schedule_shipment",
                     retry=Retry(max_attempts=None, on_exhausted="park"),
                     payload={"reservation": result("reserve", "reservation_id")}),
                ...),
        ])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from outbox_relay.message import RESULT_REF

# What saga input fields may be declared as.
FieldType = (
    type[str] | type[int] | type[float] | type[bool] | type[dict[str, Any]] | type[list[Any]]
)
FIELD_TYPES: tuple[type, ...] = (str, int, float, bool, dict, list)


@dataclass(frozen=True, slots=True)
class Ref:
    """A value taken, when the command is built, from the saga's data or a step's result."""

    source: Literal["data", "result"]
    path: tuple[str, ...]
    step: str | None = None

    def describe(self) -> str:
        if self.source == "data":
            return "data(" + ", ".join(repr(p) for p in self.path) + ")"
        return f"result({self.step!r}, " + ", ".join(repr(p) for p in self.path) + ")"


def data(key: str, *path: str) -> Ref:
    """The saga input field ``key`` (and, optionally, a path inside it)."""
    return Ref("data", (key, *path))


def result(step: str, key: str, *path: str) -> Ref:
    """Field ``key`` of the result that step ``step`` returned."""
    return Ref("result", (key, *path), step)


@dataclass(frozen=True, slots=True)
class Retry:
    """How a step (or its compensation) is retried after a technical failure or timeout.

    ``max_attempts`` counts every attempt, the first included; None retries forever.
    The delay before attempt n+1 is ``initial * multiplier**(n-1)`` capped at
    ``maximum``, spread by +-``jitter`` (a fraction) deterministically per saga.
    When attempts run out, ``on_exhausted`` says: compensate (backward recovery) or
    park the saga for an operator.
    """

    max_attempts: int | None = 1
    initial: float = 1.0
    multiplier: float = 2.0
    maximum: float = 300.0
    jitter: float = 0.2
    on_exhausted: Literal["compensate", "park"] = "compensate"

    @property
    def retriable(self) -> bool:
        return self.max_attempts is None or self.max_attempts > 1


DEFAULT_COMPENSATION_RETRY = Retry(max_attempts=10, on_exhausted="park")


@dataclass(frozen=True, slots=True)
class Step:
    """One local transaction of a participant, and how to undo it.

    - ``compensation``: the command that undoes it; leave None only for a
      ``read_only`` step, the ``pivot``, or steps after the pivot.
    - ``result``: the fields the participant's success reply carries; later steps
      may refer to them with ``result(name, field)``.
    - ``pivot``: the go/no-go step; once it succeeded the saga only goes forward.
    - ``timeout``: seconds to wait for a reply before the attempt counts as failed.
    """

    name: str
    participant: str
    command: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    compensation: str | None = None
    compensation_payload: Mapping[str, Any] = field(default_factory=dict)
    result: tuple[str, ...] = ()
    read_only: bool = False
    pivot: bool = False
    retry: Retry = Retry()
    compensation_retry: Retry = DEFAULT_COMPENSATION_RETRY
    timeout: float = 30.0
    compensation_timeout: float = 30.0


@dataclass(frozen=True, slots=True, init=False)
class Parallel:
    """Steps dispatched together (fan-out); the saga moves on when all succeeded (fan-in)."""

    steps: tuple[Step, ...]

    def __init__(self, *steps: Step) -> None:
        object.__setattr__(self, "steps", tuple(steps))


@dataclass(frozen=True, slots=True)
class Saga:
    """A versioned saga definition. Validated by ``Registry.register``."""

    name: str
    version: int
    steps: Sequence[Step | Parallel]
    input: Mapping[str, FieldType] = field(default_factory=dict)
    description: str = ""
    # Seconds within which a saga of this definition should end. Past it the saga goes
    # on (steps have their own timeouts) but counts in sagabox_sagas_long_running, the
    # gauge to alert on; None: SAGABOX_METRICS_LONG_RUNNING_SECONDS.
    deadline: float | None = None
    # The participants forward the next command themselves, down a run of steps
    # (``slips``); the orchestrator hears from the run's last step, or from the one
    # that stopped it. Fewer messages and transitions per saga (docs/sagas.md).
    routing_slip: bool = False

    @property
    def stages(self) -> tuple[tuple[Step, ...], ...]:
        """The steps grouped as they run: one tuple per stage, in order."""
        return _derived(self, "stages", self._stages)

    def _stages(self) -> tuple[tuple[Step, ...], ...]:
        return tuple(item.steps if isinstance(item, Parallel) else (item,) for item in self.steps)

    @property
    def flat_steps(self) -> tuple[Step, ...]:
        return _derived(self, "flat_steps", lambda: tuple(s for st in self.stages for s in st))

    def step(self, name: str) -> Step:
        return _derived(self, "by_name", self._by_name)[name]

    def _by_name(self) -> dict[str, Step]:
        by_name: dict[str, Step] = {}
        for step in self.flat_steps:
            by_name.setdefault(step.name, step)  # the first, as validation reads them
        return by_name

    @property
    def slips(self) -> dict[str, tuple[Step, ...]]:
        """Step name -> the steps its participant forwards to when it succeeded.

        Empty unless ``routing_slip``. A run of steps shares a slip when each is a
        stage of its own. The pivot is never in a run (the way on depends on its
        outcome, so the orchestrator must hear it), so runs lie wholly before or
        wholly after it; and a step whose compensation needs a result of its run
        starts a new one (after a timeout the orchestrator may not have that result).
        """
        if not self.routing_slip:
            return {}
        return _derived(self, "slips", self._slips)

    def _slips(self) -> dict[str, tuple[Step, ...]]:
        runs: list[list[Step]] = [[]]
        for stage in self.stages:
            step = stage[0]
            if len(stage) > 1 or step.pivot:
                runs.append([])
                continue
            run = runs[-1]
            if run and _refers_to(step.compensation_payload, {s.name for s in run}):
                runs.append([step])
            else:
                run.append(step)
        return {
            step.name: tuple(run[index + 1 :])
            for run in runs
            for index, step in enumerate(run[:-1])
        }

    def deadline_of(self, name: str) -> float:
        """Seconds from sending step ``name``'s command to its deadline: its timeout,
        plus, at the head of a routing slip, the timeouts of the steps it forwards to."""
        return sum(s.timeout for s in (self.step(name), *self.slips.get(name, ())))

    @property
    def pivot_stage(self) -> int | None:
        for index, stage in enumerate(self.stages):
            if any(step.pivot for step in stage):
                return index
        return None


# Saga is frozen with slots (no cached_property): what derives from its steps (looked up
# on every transition) is computed once per object and kept with the object itself, so
# that an id reused by a later object never matches.
_DERIVED: dict[tuple[int, str], tuple[Saga, Any]] = {}
T = TypeVar("T")


def _derived(saga: Saga, key: str, compute: Callable[[], T]) -> T:
    cached = _DERIVED.get((id(saga), key))
    if cached is not None and cached[0] is saga:
        value: T = cached[1]
        return value
    value = compute()
    _DERIVED[(id(saga), key)] = (saga, value)
    return value


def render(
    template: Any,
    saga_data: Mapping[str, Any],
    results: Mapping[str, Any],
    later: frozenset[str] = frozenset(),
) -> Any:
    """Build a command payload from its template (refs are resolved, literals copied).

    A ref to the result of a step in ``later`` (earlier in the same routing slip, not
    yet run) becomes a ``{"$result": [step, *path]}`` placeholder for the participant
    that forwards the slip to fill in.
    """
    if isinstance(template, Ref):
        if template.source == "result" and template.step in later:
            return {RESULT_REF: [template.step, *template.path]}
        value: Any = saga_data if template.source == "data" else results[template.step or ""]
        for key in template.path:
            value = value[key]
        return value
    if isinstance(template, Mapping):
        return {key: render(value, saga_data, results, later) for key, value in template.items()}
    if isinstance(template, list | tuple):
        return [render(value, saga_data, results, later) for value in template]
    return template


def _refers_to(template: Any, steps: set[str]) -> bool:
    if isinstance(template, Ref):
        return template.source == "result" and template.step in steps
    if isinstance(template, Mapping):
        return any(_refers_to(value, steps) for value in template.values())
    if isinstance(template, list | tuple):
        return any(_refers_to(value, steps) for value in template)
    return False
