"""``sagabox bench saga --repeat``: each round's figures and the median ratio."""

from __future__ import annotations

import json

import pytest

from sagabox.benchmarks.calibrate import Calibration
from sagabox.benchmarks.drive import Run
from sagabox.benchmarks.report import render, render_rounds, to_json
from sagabox.benchmarks.result import Measured, SystemResult
from sagabox.benchmarks.run import Options, Report


def system(name: str, rate: float, cpu_ms: float) -> SystemResult:
    run = Run(count=100, seconds=100 / rate, latencies_ms=[10.0])
    return SystemResult(name, "", Measured(run, 0, {name: cpu_ms / 1000 * 100}))


def round_of(ours: float, dbos: float, temporal: float) -> Report:
    return Report(
        Options(),
        [system("sagabox", ours, 10), system("dbos", dbos, 20), system("temporal", temporal, 50)],
    )


def test_rounds_show_each_ratio_against_that_rounds_fastest_peer_and_the_median() -> None:
    text = render_rounds([round_of(90, 60, 10), round_of(60, 50, 12), round_of(100, 50, 9)])
    lines = text.splitlines()
    assert lines[1] == "3 rounds, alternating (sagas/s, then CPU ms per saga):"
    assert lines[3].split() == ["1", "90.0", "10.0", "60.0", "20.0", "10.0", "50.0", "1.50x"]
    assert lines[4].split()[-1] == "1.20x" and lines[5].split()[-1] == "2.00x"
    assert lines[-1] == "sagabox / fastest peer, median of 3 rounds: 1.50x (from 1.20x to 2.00x)"


def test_a_round_without_peers_has_no_ratio() -> None:
    text = render_rounds([Report(Options(), [system("sagabox", 80, 10)])] * 2)
    assert "median" not in text and text.splitlines()[-1].split()[-1] == "-"


def test_each_round_says_how_fast_the_machine_ran_before_and_after_it() -> None:
    rounds = [round_of(90, 60, 10), round_of(60, 50, 12)]
    rounds[0].machine = [Calibration(17.0, 110.0, 100.0), Calibration(21.25, 99.0, 130.0)]
    rounds[1].machine = [Calibration(21.0, 100.0, 80.0), Calibration(20.5, 101.0, 79.6)]
    lines = render_rounds(rounds).splitlines()
    assert lines[-2] == (
        "machine, a PostgreSQL round trip's CPU in us before -> after each round: "
        "1: 100 -> 130, 2: 80 -> 80"
    )
    assert render(rounds[0]).splitlines()[-1] == (
        "machine: a fixed Python workload 17.0 us of CPU, a PostgreSQL round trip 110 us"
        " (100 us of CPU) before the run; 21.2, 99 (130) after: +25%, -10% (+30%)"
    )
    assert "machine" not in render(round_of(90, 60, 10))


def test_the_json_holds_every_round_its_ratio_the_median_and_the_machine() -> None:
    rounds = [round_of(90, 60, 10), round_of(60, 50, 12), round_of(100, 50, 9)]
    rounds[0].machine = [Calibration(17.0, 110.0), Calibration(18.0, 120.0, 90.0)]
    rounds[0].pgbench = {16: 3402.0}
    # Strict JSON: the round trip's CPU that /proc could not tell (NaN) is null.
    document = json.loads(json.dumps(to_json(rounds), allow_nan=False))
    assert [r["ratio"] for r in document["rounds"]] == [1.5, 1.2, 2.0]
    assert document["median_ratio"] == 1.5
    first = document["rounds"][0]
    assert first["machine"][0] == {
        "python_us": 17.0,
        "roundtrip_us": 110.0,
        "roundtrip_cpu_us": None,
    }
    assert first["pgbench"] == {"16": 3402.0} and document["options"]["concurrency"] == 8
    sagabox = first["systems"][0]
    assert sagabox["name"] == "sagabox" and sagabox["main"]["run"]["latencies_ms"] == [10.0]
    assert sagabox["summary"]["sagas_per_second"] == 90.0
    assert sagabox["summary"]["cpu_ms_per_saga"]["total"] == pytest.approx(10.0)
    assert sagabox["summary"]["cpu_ms_per_saga"]["by_process"] == {"sagabox": pytest.approx(10.0)}


def test_the_json_of_a_run_without_peers_has_no_ratio() -> None:
    document = to_json([Report(Options(), [system("sagabox", 80, 10)])])
    assert document["rounds"][0]["ratio"] is None and document["median_ratio"] is None


def test_with_a_sweep_each_system_is_also_compared_at_its_best_concurrency() -> None:
    report = round_of(180, 65, 40)
    report.options = Options(concurrency=16, sweep=(1, 4, 64))
    sagabox, dbos, temporal = report.systems
    sagabox.sweep = {1: Run(50, 1.0, [20.0]), 4: Run(97, 1.0, [40.0]), 64: Run(210, 1.0, [300.0])}
    dbos.sweep = {1: Run(56, 1.0, [18.0]), 4: Run(165, 2.0, [48.0]), 64: Run(44, 1.0, [900.0])}
    temporal.sweep = {4: Run(35, 1.0, [100.0])}
    text = render(report)
    assert "sagabox / fastest peer (dbos): 2.77x sagas/s" in text
    assert (
        "best against best, over every concurrency run: sagabox 210.0 at 64 / dbos 82.5 at 4"
        " = 2.55x"
    ) in text
    assert to_json([report])["rounds"][0]["best_ratio"] == pytest.approx(210 / 82.5)
    # Without a sweep there is nothing more to say.
    assert "best against best" not in render(round_of(180, 65, 40))


def test_the_open_loop_says_its_rate_as_a_share_of_each_systems_best_closed_loop() -> None:
    report = round_of(180, 65, 40)
    report.options = Options(rate=90.0)
    sagabox, dbos, _ = report.systems
    sagabox.open = Run(100, 100 / 89.5, [20.0] * 98 + [80.0, 95.0])
    sagabox.sweep = {64: Run(200, 1.0, [300.0])}
    dbos.open = Run(100, 100 / 36.8, [9000.0])
    lines = render(report).splitlines()
    ours = next(line for line in lines if line.startswith("  sagabox "))
    assert ours.split()[1] == "89.5" and ours.endswith("p99    95.0 ms    45% of 200.0")
    peer = next(line for line in lines if line.startswith("  dbos "))
    assert peer.endswith("138% of 65.0")
