"""``sagabox trace`` reads the relay's batch lines: a line whose ``correlation_ids`` lists
the saga counts as one of its lines, and each of the saga's messages in it shows as
published by that relay (pure: log files in a temporary folder, no database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sagabox import store
from sagabox.trace import build, read_logs, render_json, render_text

SAGA = "6f1c1a52-6bb4-4c0e-9a57-2b8f4f1e0a01"
OTHER = "0b7d5f0e-3f7a-4d7e-8f43-7d1c2b9a6e02"
COMMAND = "a1111111-1111-4111-8111-111111111111"
COMPENSATION = "a2222222-2222-4222-8222-222222222222"
NOT_OURS = "b3333333-3333-4333-8333-333333333333"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def at(ms: float) -> str:
    return (T0 + timedelta(milliseconds=ms)).isoformat()


def batch_line(ms: float, message_ids: list[str], correlation_ids: list[str | None]) -> str:
    return json.dumps(
        {
            "event": "outbox_batch_published",
            "database": "127.0.0.1/orders",
            "host": "relay-host",
            "count": len(message_ids),
            "confirm_ms": 2.0,
            "message_ids": message_ids,
            "correlation_ids": correlation_ids,
            "level": "info",
            "timestamp": at(ms),
            "service": "relay",
            "pid": 4242,
        }
    )


def write_logs(folder: Path) -> Path:
    folder.mkdir()
    (folder / "relay.log").write_text(
        "\n".join(
            [
                batch_line(10, [NOT_OURS, COMMAND], [OTHER, SAGA]),
                batch_line(20, [NOT_OURS], [OTHER]),
                batch_line(50, [COMPENSATION, NOT_OURS], [SAGA, None]),
                "not json " + SAGA,
            ]
        )
        + "\n"
    )
    (folder / "payment.log").write_text(
        json.dumps(
            {
                "event": "command_applied",
                "correlation_id": SAGA,
                "message_id": COMMAND,
                "step": "authorize",
                "timestamp": at(30),
                "service": "payment",
                "pid": 7,
            }
        )
        + "\n"
    )
    return folder


def history(ms: float, event: str, step: str, emitted: list[str]) -> dict[str, Any]:
    return {
        "at": T0 + timedelta(milliseconds=ms),
        "event": event,
        "step": step,
        "attempt": 1,
        "message_id": None,
        "from_status": "running",
        "to_status": "running",
        "reason": None,
        "emitted": emitted,
    }


def databases() -> list[store.DatabaseRows]:
    rows = [history(0, "started", "authorize", [COMMAND]), history(40, "x", "x", [COMPENSATION])]
    return [store.DatabaseRows("127.0.0.1/orders", None, rows, [], [])]


def test_a_batch_line_listing_the_saga_in_correlation_ids_is_one_of_its_lines(
    tmp_path: Path,
) -> None:
    records = read_logs([write_logs(tmp_path / "logs")], SAGA)
    assert [r["event"] for r in records] == [
        "command_applied",
        "outbox_batch_published",
        "outbox_batch_published",
    ]
    # A batch of other sagas only is not.
    assert all(SAGA in r.get("correlation_ids", [SAGA]) for r in records)


def test_each_message_of_the_saga_in_a_batch_shows_as_published_by_the_relay(
    tmp_path: Path,
) -> None:
    records = read_logs([write_logs(tmp_path / "logs")], SAGA)
    trace = build(SAGA, databases(), records)
    published = [e for e in trace.entries if e.what == "outbox_published"]
    assert [e.message_id for e in published] == [COMMAND, COMPENSATION]
    assert {e.where for e in published} == {"relay"}
    # At the publishing time: the line is logged once the confirms are in.
    assert [e.at for e in published] == [
        T0 + timedelta(milliseconds=8),
        T0 + timedelta(milliseconds=48),
    ]
    for entry in published:
        assert "published by relay pid 4242 on relay-host" in entry.detail
        assert NOT_OURS not in json.dumps(entry.data)  # other sagas' ids stay out
    assert published[0].step == "authorize"
    by_id = {h.message_id: h for h in trace.hops}
    assert by_id[COMMAND].published == T0 + timedelta(milliseconds=8)
    assert by_id[COMMAND].published_by == "relay pid 4242 on relay-host"
    assert by_id[COMPENSATION].published_by == "relay pid 4242 on relay-host"

    text = render_text(trace)
    assert text.count("published by relay pid 4242 on relay-host") == 2
    document = json.loads(render_json(trace))
    assert [h["published_by"] for h in document["hops"]] == ["relay pid 4242 on relay-host"] * 2
    assert NOT_OURS not in json.dumps(document)


def test_a_debug_line_of_a_message_in_a_batch_line_does_not_show_twice() -> None:
    debug = {
        "event": "outbox_published",
        "correlation_id": SAGA,
        "message_id": COMMAND,
        "destination": "payment",
        "timestamp": at(9),
        "service": "relay",
        "pid": 4242,
    }
    trace = build(SAGA, databases(), [debug, json.loads(batch_line(10, [COMMAND], [SAGA]))])
    assert [e.what for e in trace.entries if e.source == "log"] == ["outbox_published"]
    # A relay that logs only the per-message debug line (an older one) still counts.
    trace = build(SAGA, databases(), [debug])
    [hop, _] = trace.hops
    assert hop.published == T0 + timedelta(milliseconds=9)
    assert hop.published_by == "relay pid 4242"


@pytest.mark.parametrize("local", [False, True], ids=["through_the_broker", "in_process"])
def test_a_command_forwarded_down_a_routing_slip_is_a_hop_of_its_own(local: bool) -> None:
    forwarded = "a4444444-4444-4444-8444-444444444444"
    reply = "a5555555-5555-4555-8555-555555555555"

    def line(ms: float, event: str, service: str, **fields: Any) -> dict[str, Any]:
        return {
            "event": event,
            "correlation_id": SAGA,
            "timestamp": at(ms),
            "service": service,
            "pid": 7,
            **fields,
        }

    records = [
        line(10, "command_applied", "inventory", message_id=COMMAND, step="reserve"),
        line(11, "slip_forwarded", "inventory", message_id=COMMAND, step="reserve",
             next_step="charge", next_participant="payment", next_message_id=forwarded,
             local=local),
        line(20, "command_applied", "payment", message_id=forwarded, step="charge", attempt=1),
        line(30, "saga_transitioned", "orchestrator", message_id=reply, causation_id=forwarded,
             step="charge", saga_event="step_succeeded"),
    ]  # fmt: skip
    if local:
        # A transaction redone (its batch met a refusal) logs the forward again.
        records.insert(2, {**records[1], "timestamp": at(15)})
    rows = [history(0, "started", "reserve", [COMMAND])]
    trace = build(SAGA, [store.DatabaseRows("127.0.0.1/orders", None, rows, [], [])], records)
    head, charge = trace.hops
    where = " (in process)" if local else ""
    assert (head.message_id, head.outcome) == (COMMAND, f"forwarded to charge{where}")
    assert head.replied == T0 + timedelta(milliseconds=11)
    assert (charge.message_id, charge.step, charge.written) == (
        forwarded,
        "charge",
        T0 + timedelta(milliseconds=11),
    )
    assert charge.handled == T0 + timedelta(milliseconds=20)
    assert (charge.replied, charge.outcome) == (T0 + timedelta(milliseconds=30), "step_succeeded")
    # Handled where it was forwarded: no relay published it.
    assert (charge.published, charge.published_by) == (
        (T0 + timedelta(milliseconds=11), "in process") if local else (None, None)
    )
    assert f"forwarded to charge{where}" in render_text(trace)
