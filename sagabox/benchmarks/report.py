"""The figures of a run as text: one table, the open loop, the limits, the ratios."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Any

from sagabox.benchmarks.result import SystemResult
from sagabox.benchmarks.run import Report


def own_cpu(system: SystemResult) -> float:
    """CPU seconds of the system's own processes (not PostgreSQL's, not RabbitMQ's)."""
    cpu = system.main.cpu_seconds
    return sum(v for k, v in cpu.items() if k not in ("postgres", "rabbitmq"))


def render(report: Report) -> str:
    o = report.options
    lines = [
        f"place_order (4 steps), 10% declined; sagabox runs v{o.version}"
        f"{' (routing slip)' if o.version == 3 else ''}; closed loop, concurrency "
        f"{o.concurrency}, {o.count} sagas per system",
        "",
        f"{'system':<16}{'sagas/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
        f"{'commits':>9}  {'CPU ms/saga: pg + rabbit + own = total':<40}check",
    ]
    # Replicas beyond 1 have their own table (_replicas), against the main run.
    lines += [f"{s.name:<16}{_figures(s)}{_check(s)}" for s in report.systems if s.replicas == 1]
    lines += _open(report) + _sweep(report) + _growth(report) + _replicas(report)
    lines += _limits(report) + _ratios(report)
    for s in report.systems:
        if s.main.commit_split:
            split = ", ".join(
                f"{db} {s.main.per_saga(n):.1f}" for db, n in sorted(s.main.commit_split.items())
            )
            lines.append(f"{s.name} commits per saga by database: {split}")
    for s in report.systems:
        mine = {k: v for k, v in s.main.cpu_seconds.items() if k not in ("postgres", "rabbitmq")}
        if len(mine) > 1:
            split = ", ".join(
                f"{name} {1000 * s.main.per_saga(v):.1f}" for name, v in sorted(mine.items())
            )
            lines.append(f"{s.name} own CPU ms per saga by process: {split}")
    lines += ["", "configurations:"] + [f"  {s.name}: {s.config}" for s in report.systems]
    for s in report.systems:
        lines += [f"  {s.name} consistency: {p}" for p in s.problems]
    lines += [f"note: {n}" for n in report.notes]
    lines += _machine(report)
    return "\n".join(lines)


def _machine(report: Report) -> list[str]:
    """How fast the machine ran, before and after: absolute figures of two runs compare
    only as far as these agree (sagabox.benchmarks.calibrate)."""
    if not report.machine:
        return []
    first, last = report.machine[0], report.machine[-1]
    line = (
        f"machine: a fixed Python workload {first.python_us:.1f} us of CPU, a PostgreSQL"
        f" round trip {first.roundtrip_us:.0f} us ({first.roundtrip_cpu_us:.0f} us of CPU)"
    )
    if len(report.machine) > 1:
        line += (
            f" before the run; {last.python_us:.1f}, {last.roundtrip_us:.0f}"
            f" ({last.roundtrip_cpu_us:.0f}) after: {_change(first.python_us, last.python_us)},"
            f" {_change(first.roundtrip_us, last.roundtrip_us)}"
            f" ({_change(first.roundtrip_cpu_us, last.roundtrip_cpu_us)})"
        )
    return ["", line]


def _change(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.0f}%" if before > 0 and after >= 0 else "n/a"


def _figures(s: SystemResult) -> str:
    """A row's figures, from sagas/s to the CPU per saga."""
    m, run = s.main, s.main.run
    pg, mq = m.cpu_seconds.get("postgres", 0.0), m.cpu_seconds.get("rabbitmq", 0.0)
    own = own_cpu(s)
    per = [1000 * m.per_saga(x) for x in (pg, mq, own, pg + mq + own)]
    return (
        f"{run.rate:>9.1f}{run.percentile(0.5):>9.1f}{run.percentile(0.95):>9.1f}"
        f"{run.percentile(0.99):>9.1f}{m.per_saga(m.commits):>9.1f}  "
        f"{per[0]:>6.1f} + {per[1]:>6.1f} + {per[2]:>6.1f} = {per[3]:>6.1f}{'':<9}"
    )


def _check(s: SystemResult) -> str:
    return "ok" if not s.problems else "FAILED"


def _open(report: Report) -> list[str]:
    opened = [(s, s.open) for s in report.systems if s.open is not None]
    if not opened:
        return []
    lines = [
        "",
        f"open loop: {report.options.rate:g} arrivals/s (latency from each arrival;"
        " the rate as a share of the system's highest closed-loop sagas/s)",
    ]
    for s, run in opened:
        top = max([s.main.run.rate, *(r.rate for r in s.sweep.values())])
        share = f"{100 * report.options.rate / top:4.0f}% of {top:.1f}" if top > 0 else ""
        lines.append(
            f"  {s.name:<16}{run.rate:>7.1f} sagas/s  p50 {run.percentile(0.5):7.1f}  "
            f"p95 {run.percentile(0.95):7.1f}  p99 {run.percentile(0.99):7.1f} ms  {share}"
        )
    return lines


def _sweep(report: Report) -> list[str]:
    levels = report.options.sweep
    if not levels:
        return []
    lines = ["", "sagas/s by concurrency: " + " ".join(f"{c:>8}" for c in levels)]
    for s in report.systems:
        rates = " ".join(
            f"{s.sweep[c].rate:>8.1f}" if c in s.sweep else f"{'-':>8}" for c in levels
        )
        lines.append(f"  {s.name:<22}{rates}")
    return lines


def _growth(report: Report) -> list[str]:
    by_name = {s.name: s for s in report.systems}
    empty, full = by_name.get("sagabox"), by_name.get("sagabox+preload")
    if empty is None or full is None:
        return []
    lines = [
        "",
        f"growth: {report.options.preload:,} finished sagas preloaded: "
        f"{full.main.run.rate:.1f} sagas/s vs {empty.main.run.rate:.1f} empty "
        f"({full.main.run.rate / empty.main.run.rate:.2f}x), "
        f"p50 {full.main.run.percentile(0.5):.1f} vs {empty.main.run.percentile(0.5):.1f} ms",
    ]
    for table, size in full.sizes.items():
        lines.append(
            f"  {table:<22}{size / 2**20:>10.1f} MiB (empty run: "
            f"{empty.sizes.get(table, 0) / 2**20:.1f} MiB)"
        )
    if (r := full.retention) is not None:
        left = ", ".join(f"{table} {rows:,}" for table, rows in r.rows_left.items())
        lines.append(
            f"  retention job (sagas ended over 1 h ago): purged {r.purged:,} "
            f"sagas with their history in {r.seconds:.1f} s; rows left: {left}"
        )
    return lines


def _replicas(report: Report) -> list[str]:
    """One row per replica count, N=1 being the main run, with the ratios to N=1."""
    one = next((s for s in report.systems if s.name == "sagabox"), None)
    more = sorted(
        (s for s in report.systems if s.replicas > 1 and s.name.startswith("sagabox")),
        key=lambda s: s.replicas,
    )
    if one is None or not more:
        return []
    lines = [
        "",
        "replicas: N orchestrators, N relays and N workers per service, same closed loop",
        f"  {'N':>3}{'sagas/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'commits':>9}  "
        f"{'CPU ms/saga: pg + rabbit + own = total':<42}{'check':<8}"
        f"{'sagas/s vs N=1':>16}{'CPU vs N=1':>12}",
    ]
    for s in (one, *more):
        lines.append(
            f"  {s.replicas:>3}{_figures(s)}{_check(s):<8}"
            f"{s.main.run.rate / one.main.run.rate:>15.2f}x"
            f"{_cpu_per_saga(s) / _cpu_per_saga(one):>11.2f}x"
        )
    return lines


def _limits(report: Report) -> list[str]:
    sagabox = next((s for s in report.systems if s.name == "sagabox"), None)
    if sagabox is None or (not report.pgbench and report.pika is None):
        return []
    m = sagabox.main
    commits, messages = m.per_saga(m.commits), m.per_saga(m.messages)
    lines = ["", "the machine's limits, in sagabox's sagas/s:"]
    for clients, tps in sorted(report.pgbench.items()):
        lines.append(
            f"  database: pgbench saga transition, {clients} client(s): {tps:,.0f} tps"
            f" / {commits:.1f} commits per saga = {tps / commits:,.0f} sagas/s"
        )
    if report.pika is not None:
        lines.append(
            f"  broker: raw pika, pipelined confirms: {report.pika:,.0f} msg/s"
            f" / {messages:.1f} messages per saga = {report.pika / messages:,.0f} sagas/s"
        )
    return lines


def _ratios(report: Report) -> list[str]:
    ours = next((s for s in report.systems if s.name == "sagabox"), None)
    peers = [s for s in report.systems if not s.name.startswith("sagabox")]
    if ours is None or not peers:
        return []
    best = max(peers, key=lambda s: s.main.run.rate)
    cpu_best = min(peers, key=_cpu_per_saga)
    lines = [
        "",
        f"sagabox / fastest peer ({best.name}): "
        f"{ours.main.run.rate / best.main.run.rate:.2f}x sagas/s",
    ]
    if report.options.sweep:
        (rate, c), (peer_rate, peer_c, peer) = best_points(report)
        lines.append(
            f"best against best, over every concurrency run: sagabox {rate:.1f} at {c}"
            f" / {peer} {peer_rate:.1f} at {peer_c} = {rate / peer_rate:.2f}x"
        )
    lines.append(
        f"CPU per saga, sagabox / leanest peer ({cpu_best.name}): "
        f"{_cpu_per_saga(ours) / _cpu_per_saga(cpu_best):.2f}x"
    )
    return lines


def best_points(report: Report) -> tuple[tuple[float, int], tuple[float, int, str]]:
    """sagabox's highest sagas/s and its concurrency, and the fastest peer's, over the
    main closed loop and the sweep: the issue's target compares each at its best."""

    def points(s: SystemResult) -> list[tuple[float, int]]:
        main = (s.main.run.rate, report.options.concurrency)
        return [main, *((run.rate, c) for c, run in s.sweep.items())]

    ours = next(s for s in report.systems if s.name == "sagabox")
    peers = [s for s in report.systems if not s.name.startswith("sagabox")]
    peer_rate, peer_c, peer = max((*p, s.name) for s in peers for p in points(s))
    return max(points(ours)), (peer_rate, peer_c, peer)


def _cpu_per_saga(s: SystemResult) -> float:
    cpu = s.main.cpu_seconds
    return s.main.per_saga(cpu.get("postgres", 0.0) + cpu.get("rabbitmq", 0.0) + own_cpu(s))


def render_rounds(rounds: Sequence[Report]) -> str:
    """Each round's closed-loop sagas/s and CPU per saga, and the median ratio.

    One run's ratio moves with whatever else the machine does; rounds that alternate
    sagabox and its peers, and the median of their ratios, move much less.
    """
    names = [s.name for s in rounds[0].systems if s.name != "sagabox+preload" and s.replicas == 1]
    header = "".join(f"{n:>16}" for n in names)
    lines = [
        "",
        f"{len(rounds)} rounds, alternating (sagas/s, then CPU ms per saga):",
        f"  {'round':<7}{header}{'ratio':>10}",
    ]
    ratios: list[float] = []
    for i, report in enumerate(rounds, 1):
        by_name = {s.name: s for s in report.systems}
        cells = "".join(
            f"{by_name[n].main.run.rate:>8.1f}{1000 * _cpu_per_saga(by_name[n]):>8.1f}"
            if n in by_name
            else f"{'-':>16}"
            for n in names
        )
        ratio = _ratio(report)
        if ratio is not None:
            ratios.append(ratio)
        shown = f"{ratio:>9.2f}x" if ratio is not None else f"{'-':>10}"
        lines.append(f"  {i:<7}{cells}{shown}")
    # The round trip's CPU, not the Python workload's: on this kind of machine the
    # former moves with a saga's cost while the latter stays flat (docs/benchmarks.md).
    speeds = [
        f"{i}: {r.machine[0].roundtrip_cpu_us:.0f} -> {r.machine[-1].roundtrip_cpu_us:.0f}"
        for i, r in enumerate(rounds, 1)
        if r.machine
    ]
    if speeds:
        lines.append(
            "machine, a PostgreSQL round trip's CPU in us before -> after each round: "
            + ", ".join(speeds)
        )
    if ratios:
        lines.append(
            f"sagabox / fastest peer, median of {len(ratios)} rounds: "
            f"{statistics.median(ratios):.2f}x (from {min(ratios):.2f}x to {max(ratios):.2f}x)"
        )
    return "\n".join(lines)


def _ratio(report: Report) -> float | None:
    ours = next((s for s in report.systems if s.name == "sagabox"), None)
    peers = [s for s in report.systems if not s.name.startswith("sagabox")]
    if ours is None or not peers:
        return None
    return ours.main.run.rate / max(s.main.run.rate for s in peers)


def to_json(rounds: Sequence[Report]) -> dict[str, Any]:
    """Every figure of a run and of its ``--repeat`` rounds, for ``--json``: the options,
    each round's systems (with every latency), limits, notes and machine speed, the
    figures its table prints, and the ratios. Strict JSON: what /proc could not tell
    (NaN) is null."""
    ratios = [r for r in map(_ratio, rounds) if r is not None]
    document = {
        "options": dataclasses.asdict(rounds[0].options),
        "rounds": [
            {
                "systems": [
                    {**s.to_json(), "summary": _summary(s, report)} for s in report.systems
                ],
                "ratio": _ratio(report),
                "best_ratio": _best_ratio(report),
                "pgbench": {str(clients): tps for clients, tps in report.pgbench.items()},
                "pika": report.pika,
                "notes": report.notes,
                "machine": [dataclasses.asdict(c) for c in report.machine],
            }
            for report in rounds
        ],
        "median_ratio": statistics.median(ratios) if ratios else None,
    }
    strict: dict[str, Any] = _strict(document)
    return strict


def _summary(s: SystemResult, report: Report) -> dict[str, Any]:
    """The main closed loop's figures as the table prints them (CPU in ms per saga)."""
    m, run = s.main, s.main.run
    cpu = {name: 1000 * m.per_saga(v) for name, v in m.cpu_seconds.items()}
    own = 1000 * m.per_saga(own_cpu(s))
    return {
        "sagas_per_second": run.rate,
        "p50_ms": run.percentile(0.5),
        "p95_ms": run.percentile(0.95),
        "p99_ms": run.percentile(0.99),
        "commits_per_saga": m.per_saga(m.commits),
        "cpu_ms_per_saga": {
            "postgres": cpu.get("postgres", 0.0),
            "rabbitmq": cpu.get("rabbitmq", 0.0),
            "own": own,
            "total": 1000 * _cpu_per_saga(s),
            "by_process": {k: v for k, v in cpu.items() if k not in ("postgres", "rabbitmq")},
        },
        "concurrency": report.options.concurrency,
    }


def _strict(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _best_ratio(report: Report) -> float | None:
    if _ratio(report) is None:
        return None
    (rate, _), (peer_rate, _, _) = best_points(report)
    return rate / peer_rate
