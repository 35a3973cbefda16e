"""``sagabox bench ...``: benchmarks run by hand (not timed tests). ``bench relay`` for now."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import migrations
from outbox_relay import bench
from sagabox import logs
from sagabox.settings import Env, amqp_url, database_url, libpq_url
from sagabox.settings.relay import RelaySettings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark and print its figures")
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _register_relay(benchmarks)


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
