"""``sagabox retry | skip | abort | resume``: an operator's hand on a saga.

Each is one transaction through ``Orchestrator`` (history row with the actor and
the reason, commands through the outbox); a refused action changes nothing and
exits with status 2 and the reason.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from orchestrator.errors import OperatorActionError
from orchestrator.state import SagaState
from sagabox.commands.saga import orchestrator_from_env


def register(subparsers: Any) -> None:
    retry = subparsers.add_parser("retry", help="send a new attempt of a parked step")
    _common(retry, step=True)
    retry.set_defaults(handler=retry_command)

    skip = subparsers.add_parser(
        "skip", help="count a step as done by hand (succeeded, or compensated)"
    )
    _common(skip, step=True)
    skip.add_argument("--result", help="the step's result as a JSON object (its declared fields)")
    skip.set_defaults(handler=skip_command)

    abort = subparsers.add_parser("abort", help="compensate a saga whose pivot has not passed")
    _common(abort, step=False)
    abort.set_defaults(handler=abort_command)

    resume = subparsers.add_parser("resume", help="a parked saga goes on where it stopped")
    _common(resume, step=False)
    resume.set_defaults(handler=resume_command)


def _common(parser: argparse.ArgumentParser, *, step: bool) -> None:
    parser.add_argument("saga_id")
    if step:
        parser.add_argument("--step", required=True, help="the step's name")
    parser.add_argument("--by", required=True, metavar="WHO", help="who acts (kept in the history)")
    parser.add_argument("--reason", required=True, metavar="WHY", help="why (kept in the history)")


def retry_command(args: argparse.Namespace) -> int:
    state = orchestrator_from_env().retry_step(
        args.saga_id, args.step, actor=args.by, reason=args.reason
    )
    return _report(state)


def skip_command(args: argparse.Namespace) -> int:
    result = None
    if args.result is not None:
        try:
            result = json.loads(args.result)
        except ValueError as e:
            raise OperatorActionError(f"--result is not JSON: {e}") from e
        if not isinstance(result, dict):
            raise OperatorActionError("--result must be a JSON object")
    state = orchestrator_from_env().skip_step(
        args.saga_id, args.step, actor=args.by, reason=args.reason, result=result
    )
    return _report(state)


def abort_command(args: argparse.Namespace) -> int:
    return _report(orchestrator_from_env().abort(args.saga_id, actor=args.by, reason=args.reason))


def resume_command(args: argparse.Namespace) -> int:
    return _report(orchestrator_from_env().resume(args.saga_id, actor=args.by, reason=args.reason))


def _report(state: SagaState) -> int:
    print(f"saga {state.saga_id}  {state.name} v{state.version}  {state.status}")
    return 0
