"""``sagabox orchestrator``: the reply consumer and timer sweeper as a service."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.engine import Orchestrator
from orchestrator.service import ReplyConsumer
from orchestrator.store import make_engine
from sagabox import logs
from sagabox.registry import load_registry
from sagabox.settings.orchestrator import OrchestratorSettings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("orchestrator", help="run the orchestrator service")
    parser.add_argument("--log-file", help="also write JSON log lines to this file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = OrchestratorSettings.from_env()
    logs.configure(
        "orchestrator", level=settings.log_level, log_file=args.log_file or settings.log_file
    )
    orchestrator = Orchestrator(
        make_engine(settings.database_url),
        load_registry(settings.sagas),
        reply_queue=settings.reply_queue,
    )
    consumer = ReplyConsumer(
        orchestrator,
        settings.amqp_url,
        settings.reply_queue,
        batch_size=settings.batch_size,
        timer_interval=settings.timer_interval,
        topology=settings.topology,
    )
    consumer.install_signal_handlers()
    consumer.run()
    return 0
