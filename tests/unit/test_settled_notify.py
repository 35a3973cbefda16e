"""The NOTIFY the orchestrator sends for settled sagas, as store.transitions builds it."""

from __future__ import annotations

import uuid
from typing import Any

from orchestrator.store import SETTLED_CHANNEL, transitions


def change(status: str) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "status": status, "state": {}, "wake_at": None, "revision": 1}


def test_only_settled_sagas_are_announced_with_their_status() -> None:
    changes = [change("running"), change("completed"), change("compensating"), change("failed")]
    along = transitions(changes, [])
    assert along is not None
    [(channel, param)] = along.notify
    assert channel == SETTLED_CHANNEL
    assert along.params[param] == f"{changes[1]['id']}:completed,{changes[3]['id']}:failed"
    assert "pg_notify('sagabox_saga_settled', %(settled0)s)" in along.alone()


def test_no_settled_saga_no_notify() -> None:
    along = transitions([change("running"), change("compensating")], [])
    assert along is not None and along.notify == ()
    assert "pg_notify" not in along.alone()


def test_many_settled_sagas_are_split_below_postgresqls_payload_limit() -> None:
    changes = [change("compensated") for _ in range(500)]
    along = transitions(changes, [])
    assert along is not None and len(along.notify) > 1
    payloads = [along.params[param] for _, param in along.notify]
    assert all(len(p.encode()) < 8000 for p in payloads)
    announced = [pair.partition(":")[0] for p in payloads for pair in p.split(",")]
    assert announced == [c["id"] for c in changes]


def test_an_orchestrator_may_leave_the_notify_out() -> None:
    along = transitions([change("completed")], [], notify_settled=False)
    assert along is not None and along.notify == ()
    assert "pg_notify" not in along.alone()
