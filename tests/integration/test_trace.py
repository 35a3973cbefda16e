"""``sagabox trace``: one saga's timeline from the orchestrator's history, the outbox rows
still pending, the participant's inbox and the processes' JSON logs, after a real run."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from sagabox.cli import main
from tests.integration.test_metrics import running_system

pytestmark = pytest.mark.integration


def trace(
    capsys: pytest.CaptureFixture[str], urls: dict[str, str], *args: str
) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test's own orchestrator logged
    code = main(["trace", *args, "--database-url", urls["payment"]])
    out, err = capsys.readouterr()
    return code, out, err


def assert_published(document: dict[str, Any], text: str) -> None:
    """Every step and compensation of the saga published, as the publishers' batch
    lines say at INFO (every process runs at the default level): the first command by
    the relay (a start has no consumer to publish with), the others by the orchestrator
    itself (direct publishing) or the relay (one behind an earlier row of its saga);
    every reply by payment's worker itself or the relay."""
    hops = document["hops"]
    assert [(h["step"], h["kind"]) for h in hops] == [
        ("authorize", "command"),
        ("risk", "command"),
        ("authorize", "compensation"),
    ]
    assert [h["outcome"] for h in hops] == [
        "step_succeeded",
        "step_failed",
        "compensation_succeeded",
    ]
    assert hops[0]["published_by"].startswith("relay pid "), hops[0]
    for hop in hops:
        assert hop["published"] is not None, hop
        assert hop["published_by"].startswith(("relay pid ", "orchestrator pid ")), hop
        written, published, replied = (
            datetime.fromisoformat(hop[k]) for k in ("written", "published", "replied")
        )
        assert written <= published <= replied, hop
    lines = [e for e in document["timeline"] if e["what"] == "outbox_published"]
    commands = {h["message_id"] for h in hops}
    assert commands < {e["message_id"] for e in lines}
    assert len(lines) == 2 * len(hops)
    assert {(e["source"], e["data"]["level"]) for e in lines} == {("log", "info")}
    assert {e["where"] for e in lines if e["message_id"] in commands} <= {"relay", "orchestrator"}
    assert {e["where"] for e in lines if e["message_id"] not in commands} <= {"relay", "payment"}
    published_lines = [line for line in text.splitlines() if "published by " in line]
    for hop in hops:
        assert any(
            f"published by {hop['published_by']}; message_id={hop['message_id'][:8]}" in line
            for line in published_lines
        )


def assert_every_process_logged(folder: Path, correlation_id: str) -> None:
    """The orchestrator's, the relay's and the participant's log files each hold a line
    of the saga: the relay's in a batch line's ``correlation_ids``."""
    for process in ("orchestrator", "relay", "payment"):
        lines = [json.loads(line) for line in (folder / f"{process}.log").read_text().splitlines()]
        assert lines and all(line["level"] != "debug" for line in lines), process
        ours = [
            line
            for line in lines
            if line.get("correlation_id") == correlation_id
            or correlation_id in (line.get("correlation_ids") or [])
        ]
        assert ours, f"no line of saga {correlation_id} in {process}.log"
        if process == "relay":
            assert {line["event"] for line in ours} == {"outbox_batch_published"}


def test_trace_merges_history_outbox_inbox_and_logs(
    template_db: str,
    amqp_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with running_system(template_db, amqp_url, tmp_path) as system:
        # v1: each step a message of its own, a hop to time (v2 runs three in one).
        ok = system.start(
            "authorize_payment", {"customer": "dave", "amount": 300, "card": "tok_v"}, version=1
        )
        risky = system.start(
            "authorize_payment", {"customer": "dave", "amount": 50_000, "card": "tok_v"}, version=1
        )
        system.wait_settled([ok, risky])
        system.supervisor.stop("relay")
        stuck = system.start(
            "authorize_payment", {"customer": "dave", "amount": 1, "card": "tok"}, version=1
        )
        monkeypatch.setenv("SAGABOX_DATABASE_URL", system.urls["orchestrator"])
        urls = dict(system.urls)
        logs = str(system.log_dir)
        code, out, err = trace(capsys, urls, ok, "--logs", logs, "--json")
        assert code == 0, err
        completed: dict[str, Any] = json.loads(out)
        code, out, _ = trace(capsys, urls, risky, "--logs", logs)
        assert code == 0
        compensated_text = out
        code, out, _ = trace(capsys, urls, risky, "--logs", logs, "--json")
        assert code == 0
        compensated: dict[str, Any] = json.loads(out)
        code, out, _ = trace(capsys, urls, stuck, "--json")
        assert code == 0
        pending: dict[str, Any] = json.loads(out)
        code, _, err = trace(capsys, urls, str(uuid.uuid4()), "--logs", logs)
        assert code == 2 and "no database or log knows saga" in err

    assert completed["saga"]["status"] == "completed"
    timeline = completed["timeline"]
    times = [e["at"] for e in timeline]
    assert times == sorted(times, key=datetime.fromisoformat)
    sources = {(e["source"], e["where"]) for e in timeline}
    assert {s for s, _ in sources} == {"history", "inbox", "log"}
    assert {w for s, w in sources if s == "log"} >= {"orchestrator", "payment"}
    history = [e["what"] for e in timeline if e["source"] == "history"]
    assert history[0] == "started" and len(history) == 5
    inbox = [e for e in timeline if e["source"] == "inbox"]
    assert sorted(e["step"] for e in inbox) == ["authorize", "pci", "risk", "settle"]
    hops = completed["hops"]
    assert [h["step"] for h in hops] == ["authorize", "risk", "pci", "settle"]
    for hop in hops:
        written, received, handled, replied = (
            datetime.fromisoformat(hop[k]) for k in ("written", "received", "handled", "replied")
        )
        assert written <= received <= handled <= replied, hop
        assert hop["kind"] == "command" and hop["outcome"] == "step_succeeded"

    # Text: the compensation and its reason, and where time went per step.
    assert "is above the risk limit" in compensated_text
    assert "void_authorization" in compensated_text or "compensation" in compensated_text
    assert "where time went" in compensated_text
    assert "compensated" in compensated_text.splitlines()[0]
    assert_published(compensated, compensated_text)
    assert_every_process_logged(system.file_log_dir, risky)

    # Written but never published (the relay is down): the pending outbox row shows.
    assert pending["saga"]["status"] == "running"
    assert [e["what"] for e in pending["timeline"]] == ["started", "outbox_pending"]
    (hop,) = pending["hops"]
    assert hop["pending"] and hop["step"] == "authorize" and hop["received"] is None
