"""The chaos verdict: a run that never exercised the inbox or redeliveries is INVALID."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest

from outbox_relay.failpoints import Failpoints
from sagabox.chaos import CRASH_POINTS, FAULT_KINDS, ChaosConfig, Report, _redeliveries, crash_env
from sagabox.commands.chaos import versions


def fired_everywhere(*, duplicates: int, redeliveries: int) -> Report:
    every = Counter(dict.fromkeys(FAULT_KINDS, 1))
    return Report(
        faults=every, in_flight=every.copy(), duplicates=duplicates, redeliveries=redeliveries
    )


def test_a_run_with_every_fault_duplicates_and_redeliveries_passes() -> None:
    assert fired_everywhere(duplicates=3, redeliveries=2).verdict == "PASS"


def test_a_run_without_a_duplicate_absorbed_is_invalid() -> None:
    report = fired_everywhere(duplicates=0, redeliveries=2)
    assert report.verdict == "INVALID"
    assert "  never happened: duplicates absorbed" in report.lines(ChaosConfig(10, 1, 1))


def test_a_run_without_a_redelivery_is_invalid() -> None:
    assert fired_everywhere(duplicates=1, redeliveries=0).verdict == "INVALID"


def test_a_violation_fails_whatever_else_happened() -> None:
    report = fired_everywhere(duplicates=0, redeliveries=0)
    report.violations.append("money not conserved")
    assert report.verdict == "FAIL"


def test_redeliveries_are_counted_from_participant_and_orchestrator_lines() -> None:
    lines = [
        {"event": "message_redelivered", "service": "payment"},
        {"event": "message_redelivered", "service": "inventory"},
        {"count": 5, "event": "replies_redelivered"},
        {"event": "replies_applied", "count": 100},
    ]
    text = "\n".join([*(json.dumps(x) for x in lines), "not json _redelivered"])
    assert _redeliveries(text) == 7


def test_chaos_arms_the_commit_then_ack_gaps_with_its_seed() -> None:
    env = crash_env(ChaosConfig(10, 1, seed=7, crash_probability=0.02))
    armed = Failpoints.parse(env["SAGABOX_FAILPOINTS"], seed=int(env["SAGABOX_FAILPOINTS_SEED"]))
    assert dict(armed.actions) == dict.fromkeys(CRASH_POINTS, "exit")
    assert set(armed.probabilities.values()) == {0.02}
    assert crash_env(ChaosConfig(10, 1, seed=7, crash_probability=0)) == {}


def test_the_versions_a_chaos_run_takes_turns_with() -> None:
    assert versions("1,3") == (1, 3) and versions("3") == (3,)
    for bad in ("2", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            versions(bad)
    assert Report().lines(ChaosConfig(24, 8, 1))[0] == (
        "sagabox chaos: seed 1, 24 sagas (v1, v3) over 8 s"
    )
