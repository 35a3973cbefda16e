"""What every peer process does: prepare, drive, measure, check, print one JSON line.

The parent (sagabox/benchmarks/run.py) starts ``python -m sagabox.benchmarks.peers.X``
with the run's settings and reads the last line of its stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import Engine

from orchestrator.store import make_engine
from participants.examples.checks import SagaOutcome, check, seed
from sagabox.benchmarks import cpu, store, workload
from sagabox.benchmarks.drive import Run, closed_loop, open_loop, sweep_count
from sagabox.benchmarks.peers import business
from sagabox.benchmarks.result import Measured, SystemResult, unexpected

STATS_SETTLE = 11.0  # as in saga.py: an idle backend flushes its stats at most 10 s late


class Peer(Protocol):
    name: str
    config: str

    def run_one(self, index: int) -> tuple[str, str]: ...
    def cpu_groups(self) -> dict[str, list[int] | str]: ...
    def close(self) -> None: ...


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--sweep", default="", help="comma-separated concurrencies")
    parser.add_argument("--sweep-count", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--prefix", default="sagabox_bench")
    parser.add_argument("--settle", type=float, default=STATS_SETTLE)
    return parser


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def url(admin_url: str, database: str) -> str:
    return f"{admin_url.rpartition('/')[0]}/{database}"


def prepare_app(admin_url: str, database: str, total: int) -> None:
    """A fresh application database with the example tables, seeded for ``total`` orders."""
    store.recreate_database(admin_url, database)
    engine = make_engine(url(admin_url, database), pool_size=1)
    try:
        business.create_tables(engine)
        seed({"inventory": engine, "payment": engine}, workload.seed_for(total))
    finally:
        engine.dispose()


def total_orders(args: argparse.Namespace) -> int:
    points = sum(sweep_count(args.sweep_count, c) for c in sweeps(args))
    return int(args.warmup + args.count * (2 if args.rate else 1) + points)


def sweeps(args: argparse.Namespace) -> tuple[int, ...]:
    return tuple(int(c) for c in args.sweep.split(",") if c.strip())


def drive(
    peer: Peer,
    args: argparse.Namespace,
    app: Engine,
    databases: Sequence[str],
) -> SystemResult:
    """Warm-up, sweep, open loop, then the measured closed loop; then the check."""
    say(f"{peer.name}: warming up on {args.warmup} sagas")
    runs = [closed_loop(peer.run_one, args.warmup, min(args.concurrency, 4))]
    first = args.warmup
    sweep: dict[int, Run] = {}
    for c in sweeps(args):
        n = sweep_count(args.sweep_count, c)
        say(f"{peer.name}: {n} sagas at concurrency {c}")
        sweep[c] = closed_loop(peer.run_one, n, c, first)
        first += n
    opened = None
    if args.rate:
        say(f"{peer.name}: open loop, {args.count} sagas at {args.rate:g}/s")
        opened = open_loop(peer.run_one, args.count, args.rate, first)
        first += args.count
    say(f"{peer.name}: settling {args.settle:g} s so every backend flushes its stats")
    time.sleep(args.settle)
    groups = peer.cpu_groups()
    before_cpu = cpu.sample(groups)
    before = store.commits_by_database(args.admin_url, databases)
    say(f"{peer.name}: {args.count} sagas at concurrency {args.concurrency} (measured)")
    main = closed_loop(peer.run_one, args.count, args.concurrency, first)
    used = cpu.delta(before_cpu, cpu.sample(groups))
    peer.close()  # closed pools flush their statistics
    after = store.commits_by_database(args.admin_url, databases)
    split = {db.removeprefix(f"{args.prefix}_"): n - before.get(db, 0) for db, n in after.items()}
    runs += [*sweep.values(), *([opened] if opened else []), main]
    outcomes = {
        saga_id: SagaOutcome("place_order", 1, status)
        for r in runs
        for saga_id, status in r.statuses.items()
    }
    problems = check(
        {"inventory": app, "payment": app, "shipping": app, "loyalty": app, "accounting": app},
        workload.seed_for(total_orders(args)),
        outcomes,
    )
    for r in runs:
        problems += unexpected(r, workload.expected)
    measured = Measured(main, sum(split.values()), used, 0, split)
    return SystemResult(peer.name, peer.config, measured, sweep, opened, problems)


def emit(result: SystemResult) -> None:
    print(json.dumps(result.to_json()), flush=True)
