"""The bad-input corpus: malformed messages that every queue must dead-letter with a
reason, without crashing or stalling any process (tests/integration/test_bad_input.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from outbox_relay.message import REPLY_ACTOR


@dataclass(frozen=True)
class BadMessage:
    name: str
    body: bytes


def _envelope(kind_: str, **overrides: Any) -> dict[str, Any]:
    kind = kind_
    base: dict[str, Any] = {
        "message_id": str(uuid.UUID(int=1)),
        "correlation_id": str(uuid.UUID(int=2)),
        "causation_id": None,
        "saga": "place_order",
        "version": 1,
        "step": "reserve_stock",
        "attempt": 1,
        "kind": kind,
        "type": "succeeded" if kind == "reply" else "reserve_stock",
        "payload": {},
        "reply_to": "sagabox.replies",
        "sent_at": 1.0,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _MISSING}


_MISSING = object()


def _wire(queue: str, actor: str, envelope: Any, **message: Any) -> bytes:
    body: dict[str, Any] = {
        "queue_name": queue,
        "actor_name": actor,
        "args": [envelope],
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": 1,
    }
    body.update(message)
    return json.dumps({k: v for k, v in body.items() if v is not _MISSING}).encode()


NOT_JSON: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("garbage", b"hello, world"),
    ("truncated", b'{"queue_name": "q", "args": [{'),
    ("bad utf-8", b"\xff\xfe\xfa\x00 not json"),
    ("nul bytes", b"\x00\x00\x00\x00"),
    ("json null", b"null"),
    ("json list", b"[]"),
    ("json number", b"42"),
    ("json string", b'"a string"'),
    ("nan", b'{"args": [NaN]}'),
    ("trailing garbage", b'{"args": []} trailing'),
    ("deep nesting", b"[" * 10_000 + b"]" * 10_000),
    ("xml", b"<message><args/></message>"),
    ("yaml", b"args:\n  - kind: reply\n"),
    ("latin-1 text", "caf\xe9 cr\xe8me".encode("latin-1")),
    ("utf-16", '{"args": []}'.encode("utf-16")),
    ("single quotes", b"{'args': []}"),
    ("huge number", b'{"args": [1' + b"0" * 5000 + b"]}"),
    ("only whitespace", b"   \n\t  "),
    ("binary", bytes(range(256))),
]

FIELDS = (
    "message_id",
    "correlation_id",
    "saga",
    "version",
    "step",
    "attempt",
    "kind",
    "type",
)

WRONG_VALUES: list[tuple[str, Any]] = [
    ("message_id", "not-a-uuid"),
    ("message_id", 12345),
    ("correlation_id", ""),
    ("correlation_id", None),
    ("causation_id", "nope"),
    ("saga", ""),
    ("saga", "has spaces"),
    ("saga", 7),
    ("saga", "x" * 500),
    ("version", 0),
    ("version", -1),
    ("version", "1"),
    ("version", True),
    ("version", 1.5),
    ("step", ""),
    ("step", None),
    ("step", "../etc/passwd"),
    ("attempt", 0),
    ("attempt", "1"),
    ("attempt", None),
    ("kind", "query"),
    ("kind", None),
    ("type", ""),
    ("type", {"a": 1}),
    ("payload", []),
    ("payload", "text"),
    ("payload", None),
    ("reply_to", "bad queue name"),
    ("reply_to", 3),
    ("sent_at", "yesterday"),
    ("sent_at", True),
    *[(f, []) for f in FIELDS],
    *[(f, {}) for f in FIELDS],
]


def messages(queue: str, actor: str, kind: str) -> Iterator[BadMessage]:
    """At least 100 malformed messages addressed to ``queue`` / ``actor``."""
    for name, body in NOT_JSON:
        yield BadMessage(f"not json: {name}", body)
    dramatiq_breakage: list[tuple[str, Callable[[], bytes]]] = [
        ("no args", lambda: _wire(queue, actor, {}, args=_MISSING)),
        ("args not a list", lambda: _wire(queue, actor, {}, args={"a": 1})),
        ("args empty", lambda: _wire(queue, actor, {}, args=[])),
        ("two args", lambda: _wire(queue, actor, {}, args=[_envelope(kind), _envelope(kind)])),
        ("envelope not an object", lambda: _wire(queue, actor, ["x"])),
        ("envelope null", lambda: _wire(queue, actor, None)),
        ("options null", lambda: _wire(queue, actor, _envelope(kind), options=None)),
        ("kwargs list", lambda: _wire(queue, actor, _envelope(kind), kwargs=[])),
        ("message_id int", lambda: _wire(queue, actor, _envelope(kind), message_id=5)),
        ("no actor_name", lambda: _wire(queue, actor, _envelope(kind), actor_name=_MISSING)),
        ("queue_name int", lambda: _wire(queue, actor, _envelope(kind), queue_name=9)),
        ("timestamp string", lambda: _wire(queue, actor, _envelope(kind), message_timestamp="x")),
    ]
    for name, build in dramatiq_breakage:
        yield BadMessage(f"dramatiq: {name}", build())
    for field in FIELDS:
        yield BadMessage(
            f"missing {field}", _wire(queue, actor, _envelope(kind, **{field: _MISSING}))
        )
    for field, value in WRONG_VALUES:
        yield BadMessage(
            f"{field}={value!r:.30}", _wire(queue, actor, _envelope(kind, **{field: value}))
        )
    yield BadMessage("unknown field", _wire(queue, actor, _envelope(kind, extra=1)))
    yield BadMessage(
        "many unknown fields", _wire(queue, actor, {**_envelope(kind), "a": 1, "b": 2})
    )
    if kind == "reply":
        for reply_type in ("accepted", "succeed", "SUCCEEDED", "compensate"):
            yield BadMessage(
                f"reply type {reply_type}", _wire(queue, actor, _envelope(kind, type=reply_type))
            )
        for wrong_kind in ("command", "compensation"):
            yield BadMessage(
                f"kind {wrong_kind} on the reply queue", _wire(queue, actor, _envelope(wrong_kind))
            )
        yield BadMessage(
            "10 MB payload",
            _wire(queue, actor, _envelope(kind, payload={"result": {"blob": "x" * 10_000_000}})),
        )
        for i in range(6):
            yield BadMessage(
                f"reply for a saga that does not exist #{i}",
                _wire(
                    queue,
                    actor,
                    _envelope(kind, correlation_id=str(uuid.uuid4()), message_id=str(uuid.uuid4())),
                ),
            )
    else:
        yield BadMessage(
            "unknown command",
            _wire(queue, "no_such_command", _envelope(kind, type="no_such_command")),
        )
        yield BadMessage("reply sent to a participant", _wire(queue, actor, _envelope("reply")))
        yield BadMessage(
            "compensation to a command actor", _wire(queue, actor, _envelope("compensation"))
        )
        yield BadMessage("no reply_to", _wire(queue, actor, _envelope(kind, reply_to=None)))
        yield BadMessage("10 MB of garbage", b"{" + b"x" * 10_000_000)
        for i in range(6):
            yield BadMessage(
                f"unknown actor #{i}",
                _wire(queue, f"ghost_{i}", _envelope(kind, type=f"ghost_{i}")),
            )


def reply_corpus() -> list[BadMessage]:
    return list(messages("sagabox.replies", REPLY_ACTOR, "reply"))


def command_corpus(queue: str, actor: str) -> list[BadMessage]:
    return list(messages(queue, actor, "command"))
