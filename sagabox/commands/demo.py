"""``sagabox demo``: see sagabox/demo.py."""

from __future__ import annotations

import argparse
from typing import Any

from sagabox import logs
from sagabox.demo import Demo
from sagabox.settings import Env


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole system here on a mix of sagas and check consistency"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for sagas")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    env = Env()
    demo = Demo(
        admin_url=env.str("DEMO_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        amqp_host=env.str("DEMO_AMQP_HOST", "127.0.0.1:5672"),
        timeout=args.timeout,
    )
    # The demo's own log lines go to its file; the terminal gets the report.
    demo.log_dir.mkdir(parents=True, exist_ok=True)
    with open(demo.log_dir / "demo.log", "a", encoding="utf-8") as stream:
        logs.configure("demo", stream=stream)
        return demo.run()
