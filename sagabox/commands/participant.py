"""``sagabox participant MODULE``: run the participant(s) MODULE declares, on dramatiq's
broker, until SIGTERM (settings: SAGABOX_PARTICIPANT_*, see docs/participants.md).

``--check`` only checks: the database answers and its schema is at the head of the
``participant`` and ``outbox`` branches, and RabbitMQ answers (exit 0, else 1)."""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import signal
import threading
from typing import Any

import structlog

from outbox_relay.failpoints import Failpoints
from participants import worker
from sagabox import health, logs, metrics, signals
from sagabox.settings.participant import ParticipantSettings

BRANCHES = ("outbox", "participant")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "participant",
        help="run a participant service's worker (see docs/participants.md)",
        description=__doc__,
    )
    parser.add_argument(
        "module", help="the module declaring the Participant(s), e.g. participants.examples.payment"
    )
    parser.add_argument("--processes", type=int, help="worker processes (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        help="threads per process of the threads worker (default 8; the batch worker has one)",
    )
    parser.add_argument("--log-file", help="also write JSON log lines to this file")
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (0: off; process i of N uses port + i)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if the database (at the schema head) and the broker answer, else 1",
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = ParticipantSettings.from_env()
    settings = dataclasses.replace(
        settings,
        processes=max(1, args.processes or settings.processes),
        threads=max(1, args.threads or settings.threads),
        log_file=args.log_file or settings.log_file,
        metrics_port=settings.metrics_port if args.metrics_port is None else args.metrics_port,
    )
    if args.check:
        return check(settings)
    worker.load(args.module)  # fail here, once, if the module declares no participant
    if settings.processes == 1:
        serve(args.module, settings)
        return 0
    return supervise(args.module, settings)


def check(settings: ParticipantSettings) -> int:
    problems = [
        *health.database_problems(
            settings.database_url,
            BRANCHES,
            "participant",
            direct=settings.publish == "direct",
        ),
        *health.broker_problems(settings.amqp_url),
    ]
    return health.report("participant", problems, "database (schema at head) and RabbitMQ ok")


def serve(module: str, settings: ParticipantSettings, index: int = 0) -> None:
    """One worker process: logging, then consume until SIGTERM or SIGINT."""
    participants = worker.load(module)
    service = "+".join(p.name for p in participants)
    logs.configure(service, level=settings.log_level, log_file=settings.log_file)
    if settings.metrics_port:
        metrics.serve_metrics(settings.metrics_port + index)
    stop = threading.Event()

    def on_signal(sig: signal.Signals) -> None:
        structlog.get_logger().info("participant_stopping", signal=sig.name)
        stop.set()

    signals.on_signals(on_signal)
    config = dataclasses.replace(settings.worker_config(), failpoints=Failpoints.from_env())
    worker.run(participants, config, stop)


def supervise(module: str, settings: ParticipantSettings) -> int:
    """Run ``settings.processes`` worker processes and stop them all on SIGTERM/SIGINT."""
    # spawn, not fork: each child builds its own connections and threads from scratch.
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=serve, args=(module, settings, i), name=f"participant-{i}")
        for i in range(settings.processes)
    ]

    def forward(_: signal.Signals) -> None:
        for child in children:
            if child.is_alive() and child.pid is not None:
                child.terminate()

    signals.on_signals(forward)
    for child in children:
        child.start()
    for child in children:
        child.join()
    return 0 if all(child.exitcode in (0, -signal.SIGTERM) for child in children) else 1
