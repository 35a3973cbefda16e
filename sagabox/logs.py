"""structlog set up once per process: JSON lines carrying the saga's correlation id.

Library code only calls ``structlog.get_logger()`` and binds context with
``structlog.contextvars.bound_contextvars``; the entry points call ``configure``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

from outbox_relay.redaction import redact


def add_process(service: str) -> structlog.typing.Processor:
    """A processor that stamps every line with the service name and pid."""
    pid = os.getpid()

    def processor(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
        event.setdefault("service", service)
        event["pid"] = pid
        return event

    return processor


def redact_secrets(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Mask secrets (by key) and card numbers (anywhere in strings) in a log line.

    Runs last before rendering, after the exception was rendered to text, so a card
    number quoted in an exception message or a library's log line is masked too.
    """
    return redact(event)  # type: ignore[no-any-return]


class _Tee:
    """Writes each line to several streams (stdout and an optional log file)."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> None:
        for stream in self.streams:
            stream.write(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def configure(
    service: str,
    *,
    level: str = "INFO",
    log_file: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog (and stdlib logging of pika, dramatiq, alembic) for a process."""
    streams: list[TextIO] = [stream or sys.stdout]
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        streams.append(open(log_file, "a", buffering=1, encoding="utf-8"))  # noqa: SIM115
    out = _Tee(*streams)
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        add_process(service),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # Libraries below us log through stdlib logging: render those lines the same way.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_secrets,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(
        max(numeric_level, logging.INFO) if numeric_level < logging.INFO else numeric_level
    )
    # pika is chatty at INFO about every connection step.
    logging.getLogger("pika").setLevel(logging.WARNING)


def bind(**values: Any) -> MutableMapping[str, Any]:
    """Bind context (correlation_id, message_id, ...) for the lines that follow."""
    return structlog.contextvars.bind_contextvars(**values)  # type: ignore[return-value]
