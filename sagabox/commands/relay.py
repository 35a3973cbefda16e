"""``sagabox relay``: publish every served outbox to RabbitMQ until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from typing import Any

import structlog

from outbox_relay.failpoints import Failpoints
from outbox_relay.relay import Relay, RelayConfig, check, describe_database
from sagabox import health, logs, metrics
from sagabox.settings.relay import RelaySettings

BRANCH = "outbox"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "relay",
        help="publish outbox rows to RabbitMQ (settings: SAGABOX_RELAY_*, see docs/relay.md)",
        description=__doc__,
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if every database (outbox schema at head) and the broker answer, "
        "1 (saying what failed) otherwise",
    )
    parser.add_argument("--log-file", help="also write JSON log lines to this file")
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (0: off)"
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = RelaySettings.from_env()
    settings = dataclasses.replace(
        settings,
        log_file=args.log_file or settings.log_file,
        metrics_port=settings.metrics_port if args.metrics_port is None else args.metrics_port,
    )
    config = settings.relay_config()
    if args.check:
        return run_check(config)
    logs.configure("relay", level=settings.log_level, log_file=settings.log_file)
    metrics.serve_metrics(settings.metrics_port)
    asyncio.run(serve(config, Failpoints.from_env()))
    return 0


def run_check(config: RelayConfig) -> int:
    problems = asyncio.run(check(config))
    for url in config.database_urls:
        if not any(p.startswith(f"database {describe_database(url)}:") for p in problems):
            problems += health.database_problems(url, [BRANCH], "relay")
    for problem in problems:
        print(f"sagabox relay: {problem}", file=sys.stderr)
    if not problems:
        print(
            f"sagabox relay: {len(config.database_urls)} database(s) (outbox schema at head)"
            " and RabbitMQ reachable"
        )
    return 1 if problems else 0


async def serve(config: RelayConfig, failpoints: Failpoints) -> None:
    relay = Relay(config, failpoints)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop, relay, sig)
    await relay.run()


def _stop(relay: Relay, sig: signal.Signals) -> None:
    structlog.get_logger().info("relay_stopping", signal=sig.name)
    relay.stop()
