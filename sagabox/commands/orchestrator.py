"""``sagabox orchestrator``: the reply consumer and timer sweeper as a service.

``--check`` only checks: the database answers and its schema is at the head of the
``orchestrator`` and ``outbox`` branches, and RabbitMQ answers (exit 0, else 1).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pika.exceptions

from orchestrator.engine import Orchestrator
from orchestrator.metrics import SagaGauges, deadlines
from orchestrator.service import ReplyConsumer
from orchestrator.store import SERVICE_OPTIONS, make_engine
from outbox_relay.failpoints import Failpoints
from sagabox import health, logs, metrics, signals
from sagabox.registry import load_registry
from sagabox.settings.orchestrator import OrchestratorSettings

BRANCHES = ("outbox", "orchestrator")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "orchestrator", help="run the orchestrator service", description=__doc__
    )
    parser.add_argument("--log-file", help="also write JSON log lines to this file")
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (0: off)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if the database (at the schema head) and the broker answer, else 1",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = OrchestratorSettings.from_env()
    if args.metrics_port is not None:
        settings = dataclasses.replace(settings, metrics_port=args.metrics_port)
    if args.check:
        return check(settings)
    logs.configure(
        "orchestrator", level=settings.log_level, log_file=args.log_file or settings.log_file
    )
    engine = make_engine(settings.database_url, options=SERVICE_OPTIONS)
    orchestrator = Orchestrator(
        engine,
        load_registry(settings.sagas),
        reply_queue=settings.reply_queue,
        notify_settled=settings.notify_settled,
    )
    consumer = ReplyConsumer(
        orchestrator,
        settings.amqp_url,
        settings.reply_queue,
        batch_size=settings.batch_size,
        timer_interval=settings.timer_interval,
        topology=settings.topology,
        reply_retention=settings.reply_retention,
        purge_interval=settings.purge_interval,
        saga_retention=settings.saga_retention,
        direct_lease=settings.publish_lease if settings.publish == "direct" else None,
        # 'raise' plays a connection lost between the commit and the ack: the consumer
        # reconnects and the broker redelivers the batch.
        failpoints=Failpoints.from_env(error=pika.exceptions.AMQPConnectionError),
    )
    signals.on_signals(lambda _: consumer.stop())
    if settings.metrics_port:
        # Counting every saga wants a sequential scan, which SERVICE_OPTIONS rules out.
        SagaGauges(
            make_engine(settings.database_url, pool_size=1),
            interval=settings.metrics_interval,
            long_running_after=settings.long_running_seconds,
            deadlines=deadlines(orchestrator.registry),
        ).start()
        metrics.serve_metrics(settings.metrics_port)
    consumer.run()
    return 0


def check(settings: OrchestratorSettings) -> int:
    problems = [
        *health.database_problems(
            settings.database_url,
            BRANCHES,
            "orchestrator",
            direct=settings.publish == "direct",
        ),
        *health.broker_problems(settings.amqp_url),
    ]
    return health.report("orchestrator", problems, "database (schema at head) and RabbitMQ ok")
