"""``sagabox start | show | list``: start a saga and look at sagas."""

from __future__ import annotations

import argparse
import json
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
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(handler=list_command)


def _orchestrator() -> Orchestrator:
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
    saga_id = _orchestrator().start(args.name, data, version=args.version, idempotency_key=args.key)
    print(saga_id)
    return 0


def show_saga(args: argparse.Namespace) -> int:
    view = _orchestrator().get(args.saga_id)
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
    print("steps:")
    for name, step in row.state["steps"].items():
        extra = f" attempt {step['attempt']}" if step.get("attempt") else ""
        print(f"  {name:<20} {step['status']}{extra}")
    print("history:")
    for h in view.history:
        where = f" {h['step']}#{h['attempt']}" if h["step"] else ""
        reason = f"  ({h['reason']})" if h["reason"] else ""
        at = f"{h['at']:%Y-%m-%d %H:%M:%S.%f}"
        print(f"  {h['seq']:>3} {at} {h['event']}{where} -> {h['to_status']}{reason}")
    return 0


def list_command(args: argparse.Namespace) -> int:
    orch = _orchestrator()
    with orch.engine.connect() as conn:
        rows = list_sagas(conn, status=args.status, name=args.name, limit=args.limit)
    for row in rows:
        created = f"{row.created_at:%Y-%m-%d %H:%M:%S}"
        print(f"{row.id}  {row.name:<20} v{row.version}  {row.status:<12} {created}")
    return 0
