"""``sagabox diagram NAME [--version V]``: a saga definition as a Mermaid state diagram."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.diagram import mermaid
from sagabox.registry import load_registry
from sagabox.settings.orchestrator import OrchestratorSettings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "diagram", help="print a saga definition as a Mermaid stateDiagram-v2"
    )
    parser.add_argument("name", help="saga name")
    parser.add_argument("--version", type=int, help="definition version (default: the latest)")
    parser.set_defaults(handler=diagram_command)


def diagram_command(args: argparse.Namespace) -> int:
    registry = load_registry(OrchestratorSettings.from_env().sagas)
    print(mermaid(registry.get(args.name, args.version)), end="")
    return 0
