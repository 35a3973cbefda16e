"""Saga definitions are checked when registered: every problem is named, nothing half-registers."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from orchestrator import DefinitionError, Parallel, Registry, Retry, Saga, Step, data, result
from tests.sagas import ORDER

RESERVE, CHARGE, CONFIRM, SHIP_AND_POINTS = ORDER.steps
assert isinstance(RESERVE, Step) and isinstance(CHARGE, Step) and isinstance(CONFIRM, Step)


def with_steps(*steps: Step | Parallel, **changes: Any) -> Saga:
    return dataclasses.replace(ORDER, steps=list(steps), **changes)


def step(base: Step, **changes: Any) -> Step:
    return dataclasses.replace(base, **changes)


INVALID: list[tuple[str, Saga, str]] = [
    ("bad name", dataclasses.replace(ORDER, name="no spaces"), "must match"),
    ("version 0", dataclasses.replace(ORDER, version=0), "version must be an integer >= 1"),
    ("version bool", dataclasses.replace(ORDER, version=True), "version must be an integer"),
    ("no steps", with_steps(), "at least one step"),
    ("deadline 0", dataclasses.replace(ORDER, deadline=0), "deadline must be a positive"),
    ("deadline nan", dataclasses.replace(ORDER, deadline=math.nan), "deadline must be a positive"),
    (
        "deadline text",
        dataclasses.replace(ORDER, deadline="1h"),  # type: ignore[arg-type]  # what users write
        "deadline must be a positive",
    ),
    ("same name twice", with_steps(RESERVE, RESERVE), "the name is used twice"),
    (
        "two pivots",
        with_steps(RESERVE, step(CHARGE, pivot=True, compensation=None), CONFIRM),
        "at most one pivot",
    ),
    (
        "no compensation before the pivot",
        with_steps(step(RESERVE, compensation=None), CHARGE, CONFIRM),
        "has no compensation",
    ),
    ("a timeout of 0", with_steps(step(RESERVE, timeout=0), CHARGE), "timeout must be a positive"),
    (
        "zero attempts",
        with_steps(step(RESERVE, retry=Retry(max_attempts=0)), CHARGE),
        "max_attempts must be None or an integer >= 1",
    ),
    (
        "an undeclared input field",
        with_steps(step(RESERVE, payload={"sku": data("nope")}), CHARGE),
        "is not a declared input field",
    ),
    (
        "a step's own result",
        with_steps(step(RESERVE, payload={"r": result("reserve", "reservation_id")}), CHARGE),
        "refers to the step's own result",
    ),
    (
        "a payload that is not JSON",
        with_steps(step(RESERVE, payload={"when": object()}), CHARGE),
        "is not JSON",
    ),
    ("a lone parallel step", with_steps(RESERVE, Parallel(CHARGE)), "at least two steps"),
]


@pytest.mark.parametrize(
    ("saga", "expected"), [(s, e) for _, s, e in INVALID], ids=[i for i, *_ in INVALID]
)
def test_a_bad_definition_is_refused_with_the_problem_named(saga: Saga, expected: str) -> None:
    registry = Registry()
    with pytest.raises(DefinitionError) as error:
        registry.register(saga)
    assert any(expected in problem for problem in error.value.problems), error.value.problems
    assert len(registry) == 0


def test_every_problem_is_listed_at_once() -> None:
    saga = dataclasses.replace(ORDER, version=0, deadline=-1, steps=[RESERVE, RESERVE])
    with pytest.raises(DefinitionError) as error:
        Registry().register(saga)
    assert len(error.value.problems) == 3, error.value.problems


def test_a_deadline_is_a_positive_number_of_seconds() -> None:
    saga = Registry().register(dataclasses.replace(ORDER, deadline=90))
    assert saga.deadline == 90
    assert Registry().register(ORDER).deadline is None
