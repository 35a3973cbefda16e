"""``sagabox chaos --sagas N --duration S --seed X``: see sagabox/chaos.py.

Exit status: 0 PASS, 1 FAIL (an invariant broke), 2 INVALID (a kind of fault never
fired while sagas were in flight)."""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

from sagabox import logs
from sagabox.chaos import Chaos, ChaosConfig
from sagabox.settings import Env
from sagabox.up import Replicas


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chaos",
        help="a steady load of sagas under random faults, then a verdict",
        description=__doc__,
    )
    parser.add_argument("--sagas", type=int, default=200, help="place_order sagas to start")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--seed", type=int, help="replays a run's plan (default: random)")
    parser.add_argument(
        "--replicas",
        default="orchestrator=2,relay=2,participants=2",
        help="processes per component, as for sagabox up",
    )
    parser.add_argument(
        "--fault-interval", type=float, default=2.5, help="mean seconds between faults"
    )
    parser.add_argument(
        "--crash-probability",
        type=float,
        default=0.01,
        help="chance that a process dies between its commit and its ack (failpoints)",
    )
    parser.add_argument(
        "--saga-versions",
        type=versions,
        default=(1, 3),
        help="place_order versions the sagas take turns with: 1 orchestrated, 3 on a "
        "routing slip (default: 1,3)",
    )
    parser.set_defaults(handler=run)


def versions(text: str) -> tuple[int, ...]:
    """``1,3`` as (1, 3): place_order versions, each 1 or 3 (the services chaos runs)."""
    try:
        chosen = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of versions, e.g. 1,3") from None
    if not chosen or not set(chosen) <= {1, 3}:
        raise argparse.ArgumentTypeError(f"{text!r}: choose among place_order versions 1 and 3")
    return chosen


def run(args: argparse.Namespace) -> int:
    env = Env()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    config = ChaosConfig(
        sagas=max(1, args.sagas),
        duration=max(1.0, args.duration),
        seed=seed,
        replicas=Replicas.parse(args.replicas),
        fault_interval=max(0.1, args.fault_interval),
        crash_probability=min(max(0.0, args.crash_probability), 1.0),
        versions=args.saga_versions,
        admin_url=env.str("DEMO_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        amqp_host=env.str("DEMO_AMQP_HOST", "127.0.0.1:5672"),
    )
    log_dir = Path(tempfile.mkdtemp(prefix="sagabox-chaos-"))
    print(f"sagabox chaos: seed {seed}, logs in {log_dir}")
    # Its own log lines go to a file; the terminal gets the faults and the report.
    with open(log_dir / "chaos.log", "a", encoding="utf-8") as stream:
        logs.configure("chaos", stream=stream)
        report = Chaos(config, log_dir).run()
    for line in report.lines(config):
        print(line)
    return report.exit_code
