"""sagabox.logs: JSON lines with the process fields, and the redaction processor."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import structlog

from outbox_relay.redaction import MASK, PAN_MASK
from sagabox import logs

CARD = "4111 1111 1111 1111"


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_redact_secrets_is_a_plain_processor() -> None:
    event = {"event": "charged", "password": "x", "reason": f"bad card {CARD}"}
    out = logs.redact_secrets(None, "info", event)
    assert out == {"event": "charged", "password": MASK, "reason": f"bad card {PAN_MASK}"}


def test_configured_lines_carry_process_fields_and_are_redacted(tmp_path: Path) -> None:
    stream = io.StringIO()
    log_file = tmp_path / "logs" / "svc.log"
    logs.configure("svc", stream=stream, log_file=str(log_file))
    log = structlog.get_logger()
    with structlog.contextvars.bound_contextvars(correlation_id="c-1", message_id="m-1"):
        log.info("command_refused", reason=f"card {CARD} refused", payload={"cvv": "123"})
        try:
            raise ValueError(f"cannot charge {CARD}")
        except ValueError:
            log.exception("handler_crashed")
        # Libraries log through stdlib logging (dramatiq prints the message's arguments).
        logging.getLogger("dramatiq.worker").error("Failed to process %s", {"card": CARD})
    out = lines(stream)
    assert [line["event"] for line in out[:2]] == ["command_refused", "handler_crashed"]
    first = out[0]
    assert first["correlation_id"] == "c-1" and first["message_id"] == "m-1"
    assert first["service"] == "svc" and isinstance(first["pid"], int)
    assert first["level"] == "info" and first["timestamp"].endswith("Z")
    assert first["payload"] == {"cvv": MASK}
    assert PAN_MASK in first["reason"] and PAN_MASK in out[1]["exception"]
    assert out[2]["logger"] == "dramatiq.worker" and out[2]["correlation_id"] == "c-1"
    written = stream.getvalue() + log_file.read_text()
    assert "1111 1111" not in written and "4111111111111111" not in written
    assert log_file.read_text() == stream.getvalue()
    logging.getLogger().handlers.clear()
    structlog.reset_defaults()
