"""``sagabox up``: run every component here, restart what dies (see sagabox/up.py)."""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from participants.examples import SERVICES
from sagabox import signals
from sagabox.settings import Env
from sagabox.up import Replicas, Up, UpConfig, setup


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run orchestrator, relay and example participants here, restarting what dies",
        description=__doc__ + " Databases: SAGABOX_DATABASE_URL (orchestrator) and"
        " SAGABOX_UP_PARTICIPANT_DATABASE_URLS=service=url,... (default: the orchestrator's"
        " database name + _<service>); broker: SAGABOX_AMQP_URL. See docs/deploy.md.",
    )
    parser.add_argument(
        "--replicas",
        default="",
        help="processes per component, e.g. orchestrator=2,relay=2,participants=2 (default 1)",
    )
    parser.add_argument(
        "--services",
        default=",".join(SERVICES),
        help=f"example services to run (default: {','.join(SERVICES)})",
    )
    parser.add_argument("--threads", type=int, default=4, help="worker threads per participant")
    parser.add_argument(
        "--log-dir", type=Path, help="one log file per process (default: a new temp dir)"
    )
    parser.add_argument(
        "--setup",
        action="store_true",
        help="first create and migrate the databases and seed the example services",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=15.0,
        help="seconds to wait after SIGTERM before SIGKILL (default 15)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = UpConfig.from_env(
        Env(),
        Replicas.parse(args.replicas),
        services=[s.strip() for s in args.services.split(",") if s.strip()],
        threads=max(1, args.threads),
    )
    if args.setup:
        setup(config)
        print("sagabox up: databases created, migrated and seeded")
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="sagabox-up-"))
    up = Up(config, log_dir, stop_timeout=args.stop_timeout, say=lambda s: print(s, flush=True))
    stop = threading.Event()

    def on_signal(sig: signal.Signals) -> None:
        print(f"sagabox up: {sig.name}, stopping", flush=True)
        stop.set()

    signals.on_signals(on_signal)
    return up.run(stop)
