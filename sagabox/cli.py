"""The ``sagabox`` command line: each subcommand lives in sagabox/commands/."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from outbox_relay.errors import SagaboxError

# Command modules, each with register(subparsers); imported lazily so that a
# missing optional dependency of one command never breaks the others.
COMMAND_MODULES = (
    "sagabox.commands.db",
    "sagabox.commands.saga",
    "sagabox.commands.operate",
    "sagabox.commands.diagram",
    "sagabox.commands.relay",
    "sagabox.commands.orchestrator",
    "sagabox.commands.participant",
    "sagabox.commands.demo",
    "sagabox.commands.bench",
    "sagabox.commands.trace",
    "sagabox.commands.up",
    "sagabox.commands.chaos",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sagabox", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # that command group is not written yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except SagaboxError as e:
        print(f"sagabox: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
