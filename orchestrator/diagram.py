"""A saga definition as a Mermaid ``stateDiagram-v2``: pure, from the definition alone.

What it draws, following the machine's rules (orchestrator/machine.py):
- one state per step, in stage order; a Parallel stage as a fork and a join;
- the pivot marked, with a note that the saga only goes forward after it;
- ``failed`` edges from a step to the compensation that backward recovery starts
  with (the last compensable step before it, or a sibling of its parallel stage),
  and ``retries exhausted`` edges where that differs (a step that gave up is
  compensated itself: its effect is unknown);
- compensation states chained in reverse order, ending ``Compensated``;
- ``Parked`` (status ``failed``): where a step after the pivot, a step whose retries
  run out with ``on_exhausted="park"``, or a compensation that gives up, stops;
- on a routing slip, the edges a participant takes itself labelled ``forwarded`` (``,
  same transaction`` when the next step is that participant's own), and
  a run whose first step gives up compensated from the run's last step back (any step
  of the run may have taken effect).
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.definition import Saga, Step

COMPLETED = "Completed"
COMPENSATED = "Compensated"
PARKED = "Parked"


def mermaid(definition: Saga) -> str:
    """The definition's state diagram, as Mermaid text (one line per statement)."""
    lines = ["stateDiagram-v2", f"    %% {definition.name} v{definition.version}"]
    lines += _states(definition)
    lines += _forward_edges(definition)
    lines += _failure_edges(definition)
    lines += _compensation_edges(definition)
    lines += [
        f"    {COMPLETED} --> [*]",
        f"    {COMPENSATED} --> [*]",
        f"    note right of {PARKED} : an operator retries, skips, resumes or aborts",
    ]
    return "\n".join(lines) + "\n"


def _undo(step: Step) -> str:
    return f"undo_{step.name}"


def _states(definition: Saga) -> list[str]:
    lines = []
    for step in definition.flat_steps:
        label = f"{step.name} ({step.participant}.{step.command})"
        if step.pivot:
            label += " PIVOT"
        lines.append(f'    state "{label}" as {step.name}')
        if step.compensation is not None:
            lines.append(
                f'    state "undo {step.name} ({step.participant}.{step.compensation})"'
                f" as {_undo(step)}"
            )
    for index, stage in enumerate(definition.stages):
        if len(stage) > 1:
            lines.append(f"    state fork_{index} <<fork>>")
            lines.append(f"    state join_{index} <<join>>")
    lines.append(f'    state "Parked (failed)" as {PARKED}')
    for step in definition.flat_steps:
        if step.pivot:
            lines.append(f"    note right of {step.name} : pivot, forward only once it succeeded")
    return lines


def _forward_edges(definition: Saga) -> list[str]:
    lines = []
    previous = "[*]"
    forwarded = {f.name for followers in definition.slips.values() for f in followers}
    participant = ""
    for index, stage in enumerate(definition.stages):
        if len(stage) == 1:
            how = ""
            if stage[0].name in forwarded:
                # The same service handles it in the step before's transaction.
                same = stage[0].participant == participant
                how = " : forwarded, same transaction" if same else " : forwarded"
            lines.append(f"    {previous} --> {stage[0].name}{how}")
            previous, participant = stage[0].name, stage[0].participant
            continue
        participant = ""
        lines.append(f"    {previous} --> fork_{index}")
        for step in stage:
            lines.append(f"    fork_{index} --> {step.name}")
            lines.append(f"    {step.name} --> join_{index}")
        previous = f"join_{index}"
    lines.append(f"    {previous} --> {COMPLETED}")
    return lines


def _failure_edges(definition: Saga) -> list[str]:
    lines = []
    pivot = definition.pivot_stage
    order = definition.flat_steps
    for index, stage in enumerate(definition.stages):
        after_pivot = pivot is not None and index > pivot
        for step in stage:
            if after_pivot:
                lines.append(f"    {step.name} --> {PARKED} : failed")
                continue
            # Backward recovery starts with the latest compensable step that may have
            # taken effect: one of an earlier stage or a sibling in this one; and the
            # step itself when it gave up (its effect is unknown) rather than refused.
            upto = [*order[: order.index(stage[-1]) + 1]]
            refused = _latest_undo([s for s in upto if s is not step])
            # On a routing slip, a step that gives up leaves its whole run unknown.
            upto += definition.slips.get(step.name, ())
            lines.append(f"    {step.name} --> {refused} : failed")
            if step.retry.on_exhausted == "park":
                lines.append(f"    {step.name} --> {PARKED} : retries exhausted")
            elif (gave_up := _latest_undo(upto)) != refused:
                lines.append(f"    {step.name} --> {gave_up} : retries exhausted")
    return lines


def _latest_undo(steps: Sequence[Step]) -> str:
    compensable = [s for s in steps if s.compensation is not None]
    return _undo(compensable[-1]) if compensable else COMPENSATED


def _compensation_edges(definition: Saga) -> list[str]:
    chain = [s for s in reversed(definition.flat_steps) if s.compensation is not None]
    lines = []
    for current, following in zip(chain, [*chain[1:], None], strict=True):
        target = COMPENSATED if following is None else _undo(following)
        lines.append(f"    {_undo(current)} --> {target} : compensated")
        lines.append(f"    {_undo(current)} --> {PARKED} : gave up")
    return lines
