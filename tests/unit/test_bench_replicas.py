"""``sagabox bench saga --replicas``: the counts it accepts and the table it prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagabox.benchmarks.drive import Run
from sagabox.benchmarks.report import render, render_rounds
from sagabox.benchmarks.result import Measured, Retention, SystemResult
from sagabox.benchmarks.run import Options, Report
from sagabox.benchmarks.saga import SagaboxBench
from sagabox.cli import build_parser
from sagabox.up import specs


def saga_args(*extra: str) -> tuple[int, ...]:
    args = build_parser().parse_args(["bench", "saga", *extra])
    return tuple(args.replicas)


def system(name: str, rate: float, cpu_ms: float, replicas: int = 1) -> SystemResult:
    run = Run(count=100, seconds=100 / rate, latencies_ms=[float(i) for i in range(1, 101)])
    cpu = {"postgres": cpu_ms / 1000 * 50, "relay": cpu_ms / 1000 * 50}
    return SystemResult(name, "", Measured(run, 1200, cpu), replicas=replicas)


def test_replicas_default_to_the_main_run_alone() -> None:
    assert saga_args() == (1,)


def test_replicas_are_distinct_counts_in_order() -> None:
    assert saga_args("--replicas", "2,1") == (1, 2)
    assert saga_args("--replicas", " 1, 2 ,2,3") == (1, 2, 3)


@pytest.mark.parametrize("text", ["0,1", "-1", "one", "1.5", ","])
def test_replicas_refuse_what_is_not_a_count(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        saga_args("--replicas", text)
    assert "--replicas" in capsys.readouterr().err


def test_the_replicas_table_has_a_row_per_count_with_its_ratio_to_one() -> None:
    report = Report(
        Options(replicas=(1, 2)),
        [system("sagabox", 80, 20), system("sagabox x2", 60, 25, replicas=2)],
    )
    lines = render(report).splitlines()
    start = lines.index(
        "replicas: N orchestrators, N relays and N workers per service, same closed loop"
    )
    one, two = lines[start + 2].split(), lines[start + 3].split()
    assert one[:7] == ["1", "80.0", "51.0", "96.0", "100.0", "12.0", "10.0"]
    assert one[-3:] == ["ok", "1.00x", "1.00x"]
    assert two[:2] == ["2", "60.0"] and two[-3:] == ["ok", "0.75x", "1.25x"]
    # The main table shows the main run only; the replicas run has its own table.
    assert lines[3].split()[0] == "sagabox" and lines[4] == ""


def test_a_failed_check_with_replicas_fails_the_report() -> None:
    failed = system("sagabox x2", 60, 25, replicas=2)
    failed.problems.append("stock not conserved")
    report = Report(Options(replicas=(1, 2)), [system("sagabox", 80, 20), failed])
    text = render(report)
    assert not report.ok
    assert "FAILED" in text and "sagabox x2 consistency: stock not conserved" in text


def test_no_replicas_table_without_replicas() -> None:
    assert "replicas:" not in render(Report(Options(), [system("sagabox", 80, 20)]))


def test_replicas_round_trip_through_json_and_stay_out_of_the_rounds() -> None:
    two = system("sagabox x2", 60, 25, replicas=2)
    assert SystemResult.from_json(two.to_json()).replicas == 2
    raw = system("dbos", 50, 30).to_json()
    del raw["replicas"]  # a peer's JSON line has no replicas: it counts as one
    assert SystemResult.from_json(raw).replicas == 1
    rounds = [Report(Options(), [system("sagabox", 80, 20), two, system("dbos", 50, 30)])]
    assert "sagabox x2" not in render_rounds(rounds)


def test_the_bench_runs_sagabox_ups_processes_n_of_each_with_its_settings(tmp_path: Path) -> None:
    bench = SagaboxBench(log_level="ERROR", threads=3, prefix="b", log_dir=tmp_path)
    processes = specs(bench.up_config("amqp://guest:guest@h/b", replicas=2))
    names = sorted(p.name for p in processes)
    components = ("orchestrator", "relay", "inventory", "payment", "shipping", "loyalty")
    assert names == sorted(f"{c}-{i}" for c in components for i in (1, 2))
    assert all(p.env["SAGABOX_LOG_LEVEL"] == "ERROR" for p in processes)
    (relay, _) = (p for p in processes if p.name.startswith("relay-"))
    assert relay.env["SAGABOX_RELAY_DATABASE_URLS"].split(",") == [
        bench.url(n) for n in ("orchestrator", "inventory", "payment", "shipping", "loyalty")
    ]
    worker = next(p for p in processes if p.name == "payment-2")
    assert list(worker.argv[-3:]) == ["participants.examples.payment", "--threads", "3"]
    assert worker.env["SAGABOX_PARTICIPANT_DATABASE_URL"] == bench.url("payment")


def test_the_growth_lines_say_what_the_retention_job_did() -> None:
    empty = system("sagabox", 80, 20)
    full = system("sagabox+preload", 76, 21)
    full.retention = Retention(
        1_000_000, 42.5, {"sagabox.saga": 620, "sagabox.saga_history": 3_100}
    )
    text = render(Report(Options(preload=1_000_000), [empty, full]))
    assert "growth: 1,000,000 finished sagas preloaded: 76.0 sagas/s vs 80.0 empty" in text
    assert (
        "retention job (sagas ended over 1 h ago): purged 1,000,000 sagas with their history"
        " in 42.5 s; rows left: sagabox.saga 620, sagabox.saga_history 3,100"
    ) in text
    assert SystemResult.from_json(full.to_json()).retention == full.retention
