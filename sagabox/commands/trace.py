"""``sagabox trace CORRELATION_ID``: one saga's timeline across databases and logs.

Databases: the orchestrator's (SAGABOX_DATABASE_URL) and the participants'
(``--database-url``, repeatable, or SAGABOX_TRACE_DATABASE_URLS, comma-separated).
Logs: ``--logs`` files or folders of JSON lines (e.g. the folder ``sagabox demo`` prints).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from sagabox import trace
from sagabox.settings import DEFAULT_DATABASE_URL, Env, database_url


@dataclass(frozen=True, slots=True)
class TraceSettings:
    """| SAGABOX_DATABASE_URL | the orchestrator's database |
    | SAGABOX_TRACE_DATABASE_URLS | participant databases, comma-separated (default none) |
    """

    database_urls: tuple[str, ...]

    @classmethod
    def from_env(cls, env: Env | None = None, extra: list[str] | None = None) -> TraceSettings:
        env = env or Env()
        orchestrator = database_url(
            env.str("DATABASE_URL", DEFAULT_DATABASE_URL), "SAGABOX_DATABASE_URL"
        )
        others = extra or env.list("TRACE_DATABASE_URLS", [])
        return cls(
            (
                orchestrator,
                *(database_url(u, "--database-url / SAGABOX_TRACE_DATABASE_URLS") for u in others),
            )
        )


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "trace", help="one saga's timeline across databases and logs", description=__doc__
    )
    parser.add_argument("correlation_id", help="the saga id (every message's correlation_id)")
    parser.add_argument(
        "--logs", nargs="+", default=[], metavar="DIR_OR_FILE", help="JSON log files or folders"
    )
    parser.add_argument(
        "--database-url",
        action="append",
        default=[],
        help="a participant database (repeatable; default SAGABOX_TRACE_DATABASE_URLS)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON document instead of text")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = TraceSettings.from_env(extra=args.database_url)
    found = trace.collect(args.correlation_id, settings.database_urls, args.logs)
    print(trace.render_json(found) if args.json else trace.render_text(found))
    return 0
