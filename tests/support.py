"""Helpers shared by the engine-level tests: a clock the test moves, order data, replies."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, Table, func, select

from orchestrator.machine import command_id
from outbox_relay.message import Envelope

DATA = {"order_id": "o-1", "sku": "sku-1", "qty": 2, "amount": 500}


class Clock:
    """The orchestrator's clock, moved by the test (``clock.now += 11``)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def reply(saga_id: str, step: str, type_: str, attempt: int = 1, **payload: Any) -> Envelope:
    """A participant's reply to attempt ``attempt`` of ``step`` of the ``order`` test saga."""
    return Envelope(
        message_id=str(uuid.uuid4()),
        correlation_id=saga_id,
        causation_id=command_id(saga_id, step, "command", attempt),
        saga="order",
        version=1,
        step=step,
        attempt=attempt,
        kind="reply",
        type=type_,
        payload=payload,
    )


def count(engine: Engine, table: Table) -> int:
    """Rows in ``table``."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``predicate`` every 50 ms until it holds; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {timeout} s: {predicate}")
        time.sleep(0.05)
