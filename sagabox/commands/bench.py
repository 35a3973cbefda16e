"""``sagabox bench ...``: benchmarks run by hand (not timed tests): ``relay`` and ``saga``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import migrations
from outbox_relay import bench
from sagabox import logs
from sagabox.benchmarks.errors import BenchError
from sagabox.benchmarks.plot import plot
from sagabox.benchmarks.report import render, render_rounds, to_json
from sagabox.benchmarks.run import PEERS, SAGA_PEERS, Options
from sagabox.benchmarks.run import run as run_saga
from sagabox.settings import Env, amqp_url, database_url, libpq_url
from sagabox.settings.relay import RelaySettings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark and print its figures")
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _register_relay(benchmarks)
    _register_saga(benchmarks)


def _register_relay(benchmarks: Any) -> None:
    parser = benchmarks.add_parser(
        "relay",
        help="outbox relay throughput vs raw pika, and commit-to-consume latency",
        description="Prefills N outbox rows and times the relay until the outbox is empty, "
        "against raw pipelined pika publishing the same messages, then measures latency "
        "at light load. Without URLs, uses a scratch database and RabbitMQ vhost.",
    )
    parser.add_argument("--messages", type=int, default=100_000, help="rows to relay")
    parser.add_argument("--database-url", help="a database with the outbox table (kept)")
    parser.add_argument("--amqp-url", help="an AMQP URL whose vhost may be used (kept)")
    parser.add_argument(
        "--admin-database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="where to create the scratch database (default: %(default)s)",
    )
    parser.add_argument("--latency-messages", type=int, default=200)
    parser.add_argument(
        "--spacing-ms", type=float, default=20.0, help="pause between the latency commits"
    )
    parser.set_defaults(handler=handle_relay)


def handle_relay(args: argparse.Namespace) -> int:
    env = Env()
    logs.configure("bench", level=env.str("LOG_LEVEL", "WARNING"))
    settings = RelaySettings.from_env(env)
    db = libpq_url(database_url(args.database_url, "--database-url")) if args.database_url else None
    amqp = amqp_url(args.amqp_url, "--amqp-url") if args.amqp_url else None
    result = bench.run(
        args.messages,
        database_url=db,
        amqp_url=amqp,
        admin_database_url=args.admin_database_url,
        migrate=lambda url: migrations.upgrade(url, "outbox"),
        config=settings.relay_config(),
        latency_messages=args.latency_messages,
        spacing=args.spacing_ms / 1000,
        progress=lambda line: print(f"# {line}", file=sys.stderr, flush=True),
    )
    print(result.report())
    return 0


def _register_saga(benchmarks: Any) -> None:
    parser = benchmarks.add_parser(
        "saga",
        help="end-to-end sagas/s, latency, commits and CPU per saga vs DBOS and Temporal",
        description="Runs place_order (10% declined) on sagabox's real processes, then the "
        "same saga on DBOS Transact and Temporal, and measures the database's and the broker's "
        "limits, side by side in one run (docs/benchmarks.md).",
    )
    parser.add_argument("--sagas", type=int, default=200, help="sagas per measured run")
    parser.add_argument("--concurrency", type=int, default=8, help="sagas in flight")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="also an open loop: arrivals per second"
    )
    parser.add_argument(
        "--sweep", default="", help="concurrencies for the throughput curve, e.g. 1,4,16"
    )
    parser.add_argument(
        "--sweep-sagas",
        type=int,
        default=100,
        help="sagas per sweep point (at least 4 times its concurrency)",
    )
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma-separated, among %(default)s; '' for sagabox alone",
    )
    parser.add_argument("--plot", type=Path, help="write the throughput and latency plot here")
    parser.add_argument("--json", type=Path, help="write every figure and latency here")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=4, help="threads per participant worker")
    parser.add_argument("--pgbench-seconds", type=float, default=10.0)
    parser.add_argument("--pika-messages", type=int, default=20_000)
    parser.add_argument(
        "--settle", type=float, default=11.0, help="seconds for PostgreSQL stats to flush"
    )
    parser.add_argument(
        "--preload",
        type=int,
        default=0,
        help="growth: run sagabox again on this many preloaded finished sagas (e.g. 1000000)",
    )
    parser.add_argument(
        "--replicas",
        type=replica_counts,
        default=(1,),
        help="process counts, e.g. 1,2: for each N > 1, sagabox's closed loop runs again with "
        "N orchestrators, N relays and N workers per service (default: 1)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of the closed loop, alternating sagabox and the saga peers; "
        "prints each round and the median ratio (sweep, open loop, growth, replicas and "
        "limits run in the first round only)",
    )
    parser.add_argument(
        "--saga-version",
        type=int,
        choices=(1, 3),
        default=3,
        help="place_order version sagabox runs: 3 (default) is version 1's steps on a "
        "routing slip, 1 the orchestrator sending every command",
    )
    parser.add_argument(
        "--starts",
        choices=("direct", "relay"),
        default="direct",
        help="who publishes each saga's first command: the client's StartPublisher "
        "(direct, the default) or the relay",
    )
    parser.set_defaults(handler=handle_saga)


def handle_saga(args: argparse.Namespace) -> int:
    env = Env()
    logs.configure("bench", level=env.str("LOG_LEVEL", "WARNING"))
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise BenchError(f"unknown peer(s) {', '.join(unknown)}; choose among {', '.join(PEERS)}")
    options = Options(
        count=args.sagas,
        concurrency=args.concurrency,
        rate=args.rate,
        sweep=tuple(int(c) for c in args.sweep.split(",") if c.strip()),
        sweep_count=args.sweep_sagas,
        warmup=args.warmup,
        peers=peers,
        admin_url=env.str("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        amqp_host=env.str("BENCH_AMQP_HOST", "127.0.0.1:5672"),
        log_level=env.str("BENCH_PROCESS_LOG_LEVEL", "WARNING"),
        threads=args.threads,
        pgbench_seconds=args.pgbench_seconds,
        pika_messages=args.pika_messages,
        settle=args.settle,
        preload=args.preload,
        replicas=args.replicas,
        version=args.saga_version,
        starts=args.starts,
    )
    report = run_saga(options, _say)
    print(render(report))
    rounds = [report]
    again = replace(
        options,
        sweep=(),
        rate=0.0,
        preload=0,
        replicas=(1,),
        peers=tuple(p for p in peers if p in SAGA_PEERS),
    )
    for i in range(2, max(1, args.repeat) + 1):
        _say(f"round {i} of {args.repeat}")
        rounds.append(run_saga(again, _say))
    if len(rounds) > 1:
        print(render_rounds(rounds))
    if args.json:
        args.json.write_text(json.dumps(to_json(rounds), allow_nan=False))
    if args.plot:
        plot(report, args.plot)
        print(f"plot: {args.plot}")
    return 0 if all(r.ok for r in rounds) else 1


def replica_counts(text: str) -> tuple[int, ...]:
    """``1,2`` as (1, 2): distinct process counts, each at least 1, in order."""
    try:
        counts = {int(item) for item in text.split(",") if item.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of counts, e.g. 1,2") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: counts must be integers >= 1, e.g. 1,2")
    return tuple(sorted(counts))


def _say(line: str) -> None:
    print(f"# {line}", file=sys.stderr, flush=True)
