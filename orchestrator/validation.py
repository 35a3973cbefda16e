"""Checks a saga definition when it is registered; every problem names its step.

Rules (docs/sagas.md explains why each exists):
- names are valid identifiers and unique; there is at least one step;
- a step that changes state has a compensation, or is marked ``read_only``, or is
  the pivot or comes after it (those are never compensated);
- at most one pivot, not inside a parallel group, without a compensation;
- every step after the pivot is retriable and parks (never compensates) when its
  retries run out;
- payload templates are JSON, and refer only to data that exists when the step
  runs: declared input fields, and declared result fields of steps of earlier
  stages (a compensation may not use its own step's result: it can overtake it);
- timeouts and retry policies are sane;
- with a routing slip, no payload literal uses the slip's placeholder key ``$result``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from orchestrator.definition import FIELD_TYPES, Parallel, Ref, Retry, Saga, Step
from orchestrator.errors import DefinitionError, InvalidInputError
from outbox_relay.message import RESULT_REF, is_valid_name


def validate(saga: Saga) -> None:
    """Raise DefinitionError listing every problem of ``saga``; return None if valid."""
    problems = list(_problems(saga))
    if problems:
        raise DefinitionError(getattr(saga, "name", "?"), problems)


def _problems(saga: Saga) -> Iterator[str]:
    if not is_valid_name(saga.name):
        yield f"saga name {saga.name!r} must match [a-zA-Z_][a-zA-Z0-9._-]*"
    if isinstance(saga.version, bool) or not isinstance(saga.version, int) or saga.version < 1:
        yield f"version must be an integer >= 1, got {saga.version!r}"
    for key, type_ in saga.input.items():
        if not isinstance(key, str) or not key:
            yield f"input field {key!r} must be a non-empty string"
        if type_ not in FIELD_TYPES:
            yield (
                f"input field {key!r}: type {type_!r} is not one of "
                "str, int, float, bool, dict, list"
            )
    if saga.deadline is not None and not _positive(saga.deadline):
        yield f"deadline must be a positive number of seconds, got {saga.deadline!r}"
    if not saga.steps:
        yield "a saga needs at least one step"
        return
    for item in saga.steps:
        if isinstance(item, Parallel):
            if len(item.steps) < 2:
                yield "a Parallel group needs at least two steps"
            if not all(isinstance(s, Step) for s in item.steps):
                yield "a Parallel group holds Steps only (no nested groups)"
                return
        elif not isinstance(item, Step):
            yield f"steps must be Step or Parallel, got {type(item).__name__}"
            return

    seen: set[str] = set()
    for step in saga.flat_steps:
        if step.name in seen:
            yield f"step {step.name!r}: the name is used twice"
        seen.add(step.name)

    pivots = [s.name for s in saga.flat_steps if s.pivot]
    if len(pivots) > 1:
        yield f"steps {pivots}: a saga has at most one pivot"
    pivot_stage = saga.pivot_stage

    # Result fields known after each stage, to check references against.
    known_results: dict[str, tuple[str, ...]] = {}
    for index, stage in enumerate(saga.stages):
        after_pivot = pivot_stage is not None and index > pivot_stage
        for step in stage:
            yield from _step_problems(step, len(stage) > 1, after_pivot)
            yield from _ref_problems(step, "payload", step.payload, saga.input, known_results)
            yield from _ref_problems(
                step, "compensation_payload", step.compensation_payload, saga.input, known_results
            )
        for step in stage:
            known_results[step.name] = step.result
    if not isinstance(saga.routing_slip, bool):
        yield f"routing_slip must be True or False, got {saga.routing_slip!r}"
    elif saga.routing_slip:
        for step in saga.flat_steps:
            for path, _ in _walk(step.payload, ()):
                if RESULT_REF in path:
                    at = "".join(f"[{p!r}]" for p in path[: path.index(RESULT_REF) + 1])
                    yield (
                        f"step {step.name!r} payload{at}: the key {RESULT_REF!r} is the "
                        "routing slip's placeholder; a literal cannot use it"
                    )
                    break


def _step_problems(step: Step, in_group: bool, after_pivot: bool) -> Iterator[str]:
    where = f"step {step.name!r}"
    if not is_valid_name(step.name):
        yield f"{where}: the name must match [a-zA-Z_][a-zA-Z0-9._-]*"
    if not is_valid_name(step.participant):
        yield f"{where}: participant {step.participant!r} is not a valid queue name"
    if not is_valid_name(step.command):
        yield f"{where}: command {step.command!r} is not a valid name"
    if step.compensation is not None and not is_valid_name(step.compensation):
        yield f"{where}: compensation {step.compensation!r} is not a valid name"
    if len(set(step.result)) != len(step.result) or not all(
        isinstance(f, str) and f for f in step.result
    ):
        yield f"{where}: result fields must be distinct non-empty strings"
    if step.read_only and step.compensation is not None:
        yield f"{where}: a read_only step needs no compensation; remove one of the two"
    if step.pivot:
        if in_group:
            yield f"{where}: the pivot cannot be inside a Parallel group"
        if step.compensation is not None:
            yield f"{where}: the pivot is never compensated; its compensation would never run"
    elif after_pivot:
        if step.compensation is not None:
            yield (
                f"{where}: comes after the pivot, so it is never compensated; "
                "its compensation would never run"
            )
        if not step.retry.retriable or step.retry.on_exhausted != "park":
            yield (
                f"{where}: comes after the pivot, so it must be retriable: "
                "Retry(max_attempts=None or > 1, on_exhausted='park')"
            )
    elif step.compensation is None and not step.read_only:
        yield (
            f"{where}: changes state but has no compensation; "
            "give it one, or mark it read_only=True, or place it after a pivot"
        )
    for label, seconds in (
        ("timeout", step.timeout),
        ("compensation_timeout", step.compensation_timeout),
    ):
        if not _positive(seconds):
            yield f"{where}: {label} must be a positive number of seconds, got {seconds!r}"
    yield from _retry_problems(where, "retry", step.retry)
    yield from _retry_problems(where, "compensation_retry", step.compensation_retry)
    if step.compensation is not None and step.compensation_retry.on_exhausted != "park":
        yield f"{where}: a compensation cannot itself be compensated; use on_exhausted='park'"


def _retry_problems(where: str, label: str, retry: Retry) -> Iterator[str]:
    if retry.max_attempts is not None and (
        isinstance(retry.max_attempts, bool)
        or not isinstance(retry.max_attempts, int)
        or retry.max_attempts < 1
    ):
        yield f"{where}: {label}.max_attempts must be None or an integer >= 1"
    if not (_non_negative(retry.initial) and _non_negative(retry.maximum)):
        yield f"{where}: {label} delays must be numbers >= 0"
    if not _non_negative(retry.multiplier) or retry.multiplier < 1:
        yield f"{where}: {label}.multiplier must be >= 1"
    if not _non_negative(retry.jitter) or retry.jitter >= 1:
        yield f"{where}: {label}.jitter must be in [0, 1)"
    if retry.on_exhausted not in ("compensate", "park"):
        yield f"{where}: {label}.on_exhausted must be 'compensate' or 'park'"


def _ref_problems(
    step: Step,
    label: str,
    template: Any,
    inputs: Mapping[str, Any],
    known_results: Mapping[str, tuple[str, ...]],
) -> Iterator[str]:
    where = f"step {step.name!r} {label}"
    for path, value in _walk(template, ()):
        at = "".join(f"[{p!r}]" for p in path)
        if isinstance(value, Ref):
            if value.source == "data":
                if value.path[0] not in inputs:
                    yield f"{where}{at}: {value.describe()} is not a declared input field"
            elif value.step == step.name:
                yield f"{where}{at}: {value.describe()} refers to the step's own result"
            elif value.step not in known_results:
                yield (
                    f"{where}{at}: {value.describe()} refers to a step that has not "
                    "finished when this one runs (later, parallel or unknown)"
                )
            elif value.path[0] not in known_results[value.step or ""]:
                yield (
                    f"{where}{at}: {value.describe()}: step {value.step!r} declares no "
                    f"result field {value.path[0]!r}"
                )
        elif not (value is None or isinstance(value, str | int | float | bool)):
            kind = type(value).__name__
            yield f"{where}{at}: {kind} is not JSON (use data()/result() or literals)"
        elif isinstance(value, float) and not math.isfinite(value):
            yield f"{where}{at}: {value!r} is not valid JSON"


def _walk(template: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(template, Mapping):
        for key, value in template.items():
            if not isinstance(key, str):
                yield (*path, repr(key)), object()
                continue
            yield from _walk(value, (*path, key))
    elif isinstance(template, list | tuple):
        for index, value in enumerate(template):
            yield from _walk(value, (*path, str(index)))
    else:
        yield path, template


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _non_negative(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def check_input(saga: Saga, data: object) -> dict[str, Any]:
    """Check saga data against the declared input; raise InvalidInputError listing all faults."""
    if not isinstance(data, Mapping):
        raise InvalidInputError(
            f"saga {saga.name!r}: data must be a JSON object, got {type(data).__name__}"
        )
    problems: list[str] = []
    for key, type_ in saga.input.items():
        if key not in data:
            problems.append(f"missing field {key!r} ({type_.__name__})")
        elif not _is_instance(data[key], type_):
            problems.append(
                f"field {key!r} must be {type_.__name__}, got {type(data[key]).__name__}"
            )
    problems.extend(f"unknown field {key!r}" for key in data if key not in saga.input)
    if problems:
        raise InvalidInputError(f"saga {saga.name!r} v{saga.version}: " + "; ".join(problems))
    return dict(data)


def _is_instance(value: object, type_: type) -> bool:
    # bool is an int subclass in Python but not in anyone's JSON schema.
    if isinstance(value, bool) and type_ is not bool:
        return False
    if type_ is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, type_)
