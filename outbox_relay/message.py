"""The message contract: one envelope for commands, compensations and replies.

On the wire every message is a dramatiq message (JSON) whose single positional
argument is the envelope, so a participant's dramatiq actor receives it as is:

    {"queue_name": "inventory", "actor_name": "reserve_stock",
     "args": [{...envelope...}], "kwargs": {}, "options": {},
     "message_id": "<envelope.message_id>", "message_timestamp": 1700000000000}

The envelope's fields are documented in docs/messages.md. Parsing is strict:
anything malformed raises MessageError with the reason, never a KeyError.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

from outbox_relay.errors import MessageError

Kind = Literal["command", "compensation", "reply"]
KINDS: frozenset[str] = frozenset(get_args(Kind))

ReplyType = Literal[
    "succeeded", "failed", "error", "cancelled", "compensated", "compensation_failed"
]
REPLY_TYPES: frozenset[str] = frozenset(get_args(ReplyType))

# The dramatiq actor name every reply is sent to (the orchestrator's reply consumer).
REPLY_ACTOR = "saga_reply"
DEFAULT_REPLY_QUEUE = "sagabox.replies"

# Matches dramatiq's own rule for queue names, so every destination we write is
# one a dramatiq worker can consume.
NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9._-]*")
MAX_NAME_LENGTH = 200

# W3C Trace Context, version 00: lowercase hex only (https://www.w3.org/TR/trace-context/).
TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


def is_valid_name(value: object) -> bool:
    """True for a name usable as a queue, actor, saga, step or command name."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_NAME_LENGTH
        and NAME_RE.fullmatch(value) is not None
    )


def is_valid_traceparent(value: object) -> bool:
    """True for a W3C ``traceparent`` (version 00) whose trace and parent ids are not zero."""
    if not isinstance(value, str):
        return False
    match = TRACEPARENT_RE.fullmatch(value)
    # The spec makes all-zero ids invalid: they would join unrelated traces into one.
    return match is not None and int(match[1], 16) != 0 and int(match[2], 16) != 0


# A payload placeholder for a result produced earlier in the same routing slip,
# ``{"$result": [step, key, *path]}``: the orchestrator cannot know that value when it
# sends the slip, so the participant that forwards the next command fills it in.
RESULT_REF = "$result"


@dataclass(frozen=True, slots=True)
class SlipStep:
    """A command of a routing slip: sent by the participant of the step before it,
    once that step succeeded, instead of a reply to the orchestrator."""

    step: str
    participant: str  # its queue
    type: str
    attempt: int
    message_id: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    # The result fields this step must return before it may forward the slip.
    result: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "participant": self.participant,
            "type": self.type,
            "attempt": self.attempt,
            "message_id": self.message_id,
            "payload": dict(self.payload),
            "result": list(self.result),
        }


@dataclass(frozen=True, slots=True)
class Slip:
    """The routing slip a command carries (the steps to forward to) and a reply carries
    (what the slip's earlier steps returned). docs/messages.md has the contract."""

    # The result fields the step of this command must return before it forwards.
    result: tuple[str, ...] = ()
    next: tuple[SlipStep, ...] = ()
    # Step name -> result, for the steps of this slip that succeeded before this message.
    results: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": list(self.result),
            "next": [s.to_dict() for s in self.next],
            "results": {k: dict(v) for k, v in self.results.items()},
        }


@dataclass(frozen=True, slots=True)
class Envelope:
    """What every sagabox message carries. Immutable; see docs/messages.md."""

    message_id: str
    correlation_id: str
    causation_id: str | None
    saga: str
    version: int
    step: str
    attempt: int
    kind: Kind
    type: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    reply_to: str | None = None
    sent_at: float = 0.0
    # The W3C trace context of the saga's caller, so one trace follows the saga.
    traceparent: str | None = None
    # Only in sagas defined with a routing slip (docs/sagas.md).
    slip: Slip | None = None

    def to_dict(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict deep-copies the payload, which cost more
        # than the JSON encoding of the whole message.
        data = {
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "saga": self.saga,
            "version": self.version,
            "step": self.step,
            "attempt": self.attempt,
            "kind": self.kind,
            "type": self.type,
            "payload": dict(self.payload),
            "reply_to": self.reply_to,
            "sent_at": self.sent_at,
        }
        # Left out when absent: a consumer that predates the field refuses unknown
        # fields, so messages without trace context stay readable by it.
        if self.traceparent is not None:
            data["traceparent"] = self.traceparent
        if self.slip is not None:
            data["slip"] = self.slip.to_dict()
        return data


def encode(envelope: Envelope, *, queue: str, actor: str) -> str:
    """The wire body (a dramatiq message as JSON text) for an envelope."""
    message = {
        "queue_name": queue,
        "actor_name": actor,
        "args": [envelope.to_dict()],
        "kwargs": {},
        "options": {},
        "message_id": envelope.message_id,
        "message_timestamp": int((envelope.sent_at or time.time()) * 1000),
    }
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# Year 2286: far enough for any clock, small enough for every timestamp type.
MAX_SENT_AT = 10_000_000_000

# Saga state keeps step results, so one reply must not be able to bloat it.
MAX_MESSAGE_BYTES = 1024 * 1024


def decode(body: bytes | str, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
    """Parse a wire body into an Envelope, or raise MessageError saying why."""
    if len(body) > max_bytes:
        raise MessageError(f"message of {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        message = json.loads(body, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MessageError(f"body is not JSON: {str(e)[:200]}") from e
    if not isinstance(message, dict):
        raise MessageError("body is not a JSON object")
    args = message.get("args")
    if not isinstance(args, list) or len(args) != 1:
        raise MessageError("'args' must be a list holding exactly one envelope")
    return envelope_from_dict(args[0])


def envelope_from_dict(data: object) -> Envelope:
    """Validate a decoded envelope (a dramatiq actor's argument) field by field."""
    if not isinstance(data, dict):
        raise MessageError("envelope is not a JSON object")
    unknown = set(data) - _FIELDS
    if unknown:
        raise MessageError(f"envelope has unknown fields: {sorted(unknown)}")
    message_id = _uuid(data, "message_id")
    correlation_id = _uuid(data, "correlation_id")
    causation = data.get("causation_id")
    causation_id = None if causation is None else _uuid(data, "causation_id")
    saga = _name(data, "saga")
    version = _int(data, "version", minimum=1)
    step = _name(data, "step")
    attempt = _int(data, "attempt", minimum=1)
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise MessageError(f"'kind' must be one of {sorted(KINDS)}, got {kind!r}")
    type_ = _name(data, "type")
    if kind == "reply" and type_ not in REPLY_TYPES:
        raise MessageError(f"reply 'type' must be one of {sorted(REPLY_TYPES)}, got {type_!r}")
    payload = data.get("payload", {})
    if not isinstance(payload, dict):
        raise MessageError("'payload' must be a JSON object")
    reply_to = data.get("reply_to")
    if reply_to is not None and not is_valid_name(reply_to):
        raise MessageError(f"'reply_to' is not a valid queue name: {reply_to!r}")
    sent_at = data.get("sent_at", 0.0)
    if (
        isinstance(sent_at, bool)
        or not isinstance(sent_at, int | float)
        or not 0 <= sent_at <= MAX_SENT_AT
    ):
        raise MessageError(
            f"'sent_at' must be seconds since the epoch (0 to {MAX_SENT_AT}), got {sent_at!r:.40}"
        )
    traceparent = data.get("traceparent")
    if traceparent is not None and not is_valid_traceparent(traceparent):
        raise MessageError(
            f"'traceparent' must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>, "
            f"ids not all zero), got {traceparent!r:.80}"
        )
    slip = data.get("slip")
    return Envelope(
        message_id=message_id,
        correlation_id=correlation_id,
        causation_id=causation_id,
        saga=saga,
        version=version,
        step=step,
        attempt=attempt,
        kind=cast(Kind, kind),
        type=type_,
        payload=payload,
        reply_to=reply_to,
        sent_at=float(sent_at),
        traceparent=traceparent,
        slip=None if slip is None else slip_from_dict(slip),
    )


def slip_from_dict(data: object) -> Slip:
    """Validate the ``slip`` field of an envelope."""
    if not isinstance(data, dict):
        raise MessageError("'slip' must be a JSON object")
    unknown = set(data) - {"result", "next", "results"}
    if unknown:
        raise MessageError(f"'slip' has unknown fields: {sorted(unknown)}")
    results = data.get("results", {})
    if not isinstance(results, dict) or not all(
        is_valid_name(k) and isinstance(v, dict) for k, v in results.items()
    ):
        raise MessageError("'slip.results' must map step names to JSON objects")
    steps = data.get("next", [])
    if not isinstance(steps, list):
        raise MessageError("'slip.next' must be a list")
    return Slip(
        result=_names(data, "result", "slip.result"),
        next=tuple(_slip_step(s) for s in steps),
        results=results,
    )


def _slip_step(data: object) -> SlipStep:
    if not isinstance(data, dict):
        raise MessageError("'slip.next' must hold JSON objects")
    unknown = set(data) - _SLIP_STEP_FIELDS
    if unknown:
        raise MessageError(f"a step of 'slip.next' has unknown fields: {sorted(unknown)}")
    payload = data.get("payload", {})
    if not isinstance(payload, dict):
        raise MessageError("'payload' of a step of 'slip.next' must be a JSON object")
    return SlipStep(
        step=_name(data, "step"),
        participant=_name(data, "participant"),
        type=_name(data, "type"),
        attempt=_int(data, "attempt", minimum=1),
        message_id=_uuid(data, "message_id"),
        payload=payload,
        result=_names(data, "result", "result of a step of 'slip.next'"),
    )


def _names(data: Mapping[str, Any], key: str, label: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise MessageError(f"'{label}' must be a list of field names")
    return tuple(value)


_SLIP_STEP_FIELDS = frozenset(SlipStep.__dataclass_fields__)
_FIELDS = frozenset(Envelope.__dataclass_fields__)


def _refuse_constant(name: str) -> object:
    # NaN and Infinity are not JSON, and PostgreSQL's jsonb would refuse them later.
    raise ValueError(f"{name} is not valid JSON")


def _uuid(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise MessageError(f"'{key}' must be a UUID string, got {type(value).__name__}")
    try:
        return str(uuid.UUID(value))
    except ValueError as e:
        raise MessageError(f"'{key}' is not a UUID: {value[:64]!r}") from e


def _name(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not is_valid_name(value):
        raise MessageError(f"'{key}' must be a name matching {NAME_RE.pattern}, got {value!r:.80}")
    return cast(str, value)


def _int(data: Mapping[str, Any], key: str, *, minimum: int) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MessageError(f"'{key}' must be an integer >= {minimum}, got {value!r:.40}")
    return value
