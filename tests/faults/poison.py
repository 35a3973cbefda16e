"""A test participant whose ``swallow`` command kills its worker on every delivery.

Run as ``sagabox participant tests.faults.poison``. Each delivery first appends a line
to the file named by ``POISON_DELIVERIES`` (so the test can count deliveries across
worker restarts), then ends the process the way a segfault or the OOM killer would:
no exception for dramatiq to catch, no nack, no retry bookkeeping.
"""

from __future__ import annotations

import os

from sqlalchemy.orm import Session

from participants import Context, Participant, Payload

poison = Participant("poison")


@poison.command("swallow", compensation="spit")
def swallow(session: Session, payload: Payload, ctx: Context) -> None:
    with open(os.environ["POISON_DELIVERIES"], "a") as deliveries:
        deliveries.write(f"{ctx.saga_id}\n")
    os._exit(137)


@poison.compensation("spit")
def spit(session: Session, payload: Payload, ctx: Context) -> None:
    """Nothing to undo: ``swallow`` never commits anything."""
