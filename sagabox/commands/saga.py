"""``sagabox start | show | list``: start a saga and look at sagas."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from typing import Any

from orchestrator.engine import Orchestrator
from orchestrator.errors import InvalidInputError
from orchestrator.store import list_sagas, make_engine
from sagabox.registry import load_registry
from sagabox.settings.orchestrator import OrchestratorSettings


def register(subparsers: Any) -> None:
    start = subparsers.add_parser("start", help="start a saga; prints its id")
    start.add_argument("name", help="saga name")
    start.add_argument("--data", required=True, help="the saga's input as a JSON object")
    start.add_argument("--version", type=int, help="definition version (default: the latest)")
    start.add_argument("--key", help="idempotency key: starting twice returns the same saga")
    start.set_defaults(handler=start_saga)

    show = subparsers.add_parser("show", help="one saga with its whole history")
    show.add_argument("saga_id")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=show_saga)

    listing = subparsers.add_parser("list", help="list sagas by state and name")
    listing.add_argument(
        "--status", choices=["running", "compensating", "completed", "compensated", "failed"]
    )
    listing.add_argument("--name")
    listing.add_argument(
        "--older-than",
        type=parse_age,
        metavar="AGE",
        help="only sagas started longer ago than AGE (e.g. 90s, 10m, 2h, 3d)",
    )
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(handler=list_command)


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> dt.timedelta:
    """'90s', '10m', '2h', '3d' as a timedelta (argparse reports a bad one)."""
    match = _AGE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age like 90s, 10m, 2h or 3d")
    return dt.timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])


def format_age(age: dt.timedelta) -> str:
    """The two largest units: 45s, 12m30s, 3h5m, 2d4h."""
    seconds = max(0, int(age.total_seconds()))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count or parts:
            parts.append(f"{count}{unit}")
    return "".join(parts[:2]) or "0s"


def orchestrator_from_env() -> Orchestrator:
    """The Orchestrator the saga commands work through, from SAGABOX_* settings."""
    settings = OrchestratorSettings.from_env()
    return Orchestrator(
        make_engine(settings.database_url, pool_size=1),
        load_registry(settings.sagas),
        reply_queue=settings.reply_queue,
    )


def start_saga(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except ValueError as e:
        raise InvalidInputError(f"--data is not JSON: {e}") from e
    saga_id = orchestrator_from_env().start(
        args.name, data, version=args.version, idempotency_key=args.key
    )
    print(saga_id)
    return 0


def show_saga(args: argparse.Namespace) -> int:
    view = orchestrator_from_env().get(args.saga_id)
    row = view.row
    if args.json:
        out = {
            "id": row.id,
            "name": row.name,
            "version": row.version,
            "status": row.status,
            "state": row.state,
            "created_at": str(row.created_at),
            "updated_at": str(row.updated_at),
            "history": [
                {k: (str(v) if k == "at" else v) for k, v in h.items()} for h in view.history
            ],
        }
        json.dump(out, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(f"saga {row.id}  {row.name} v{row.version}  {row.status}")
    if row.state.get("reason"):
        print(f"reason: {row.state['reason']}")
    if row.state.get("parked_step"):
        print(f"parked at step: {row.state['parked_step']}")
    print("steps:")
    for name, step in row.state["steps"].items():
        extra = f" attempt {step['attempt']}" if step.get("attempt") else ""
        print(f"  {name:<20} {step['status']}{extra}")
    print("history:")
    for h in view.history:
        where = f" {h['step']}" if h["step"] else ""
        where += f"#{h['attempt']}" if h["attempt"] else ""
        reason = f"  ({h['reason']})" if h["reason"] else ""
        if h.get("actor"):
            reason = f"  [by {h['actor']}]{reason}"
        at = f"{h['at']:%Y-%m-%d %H:%M:%S.%f}"
        print(f"  {h['seq']:>3} {at} {h['event']}{where} -> {h['to_status']}{reason}")
    return 0


def list_command(args: argparse.Namespace) -> int:
    orch = orchestrator_from_env()
    now = dt.datetime.now(dt.UTC)
    older_than = None if args.older_than is None else now - args.older_than
    with orch.engine.connect() as conn:
        rows = list_sagas(
            conn, status=args.status, name=args.name, older_than=older_than, limit=args.limit
        )
    for row in rows:
        created = f"{row.created_at:%Y-%m-%d %H:%M:%S}"
        age = format_age(now - row.created_at) if row.created_at else "?"
        print(f"{row.id}  {row.name:<20} v{row.version}  {row.status:<12} {created}  {age:>7}")
    return 0
