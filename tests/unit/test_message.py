"""The message contract: round trips, and a decoder that fails only with MessageError."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox_relay.errors import MessageError
from outbox_relay.message import Envelope, Slip, SlipStep, decode, encode, envelope_from_dict

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
FIELD_NAMES = st.sampled_from([*sorted(Envelope.__dataclass_fields__), "extra", "args", ""])


def envelope(**overrides: Any) -> Envelope:
    fields: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "correlation_id": str(uuid.uuid4()),
        "causation_id": None,
        "saga": "place_order",
        "version": 1,
        "step": "reserve",
        "attempt": 1,
        "kind": "command",
        "type": "reserve_stock",
        "payload": {"sku": "a", "qty": 2},
        "reply_to": "sagabox.replies",
        "sent_at": 1.5,
    }
    fields.update(overrides)
    return Envelope(**fields)


def test_an_envelope_survives_the_wire() -> None:
    original = envelope()
    body = encode(original, queue="inventory", actor="reserve_stock")
    message = json.loads(body)
    assert message["queue_name"] == "inventory" and message["actor_name"] == "reserve_stock"
    assert message["message_id"] == original.message_id
    assert decode(body) == original


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_message_error(body: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode(body)


@settings(max_examples=500)
@given(JSON)
def test_any_json_as_the_argument_decodes_or_raises_message_error(arg: Any) -> None:
    body = json.dumps({"args": [arg]})
    with pytest.raises(MessageError):
        decode(body)


@settings(max_examples=1000)
@given(FIELD_NAMES, JSON)
def test_one_corrupted_field_is_refused_with_a_message_error(name: str, value: Any) -> None:
    data = envelope().to_dict()
    data[name] = value
    try:
        parsed = envelope_from_dict(data)
    except MessageError:
        return
    # Whatever got through must be a valid envelope that encodes again.
    assert decode(encode(parsed, queue="q", actor="a")) == parsed


def test_a_message_over_the_size_limit_is_refused() -> None:
    body = encode(envelope(payload={"blob": "x" * 2_000_000}), queue="q", actor="a")
    with pytest.raises(MessageError, match="exceeds the limit"):
        decode(body)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(constant: str) -> None:
    body = encode(envelope(), queue="q", actor="a").replace(
        '"sent_at":1.5', f'"sent_at":{constant}'
    )
    with pytest.raises(MessageError, match="not valid JSON"):
        decode(body)


def test_to_dict_names_every_field_of_the_envelope() -> None:
    # to_dict is spelled out for speed: a field added to Envelope must be added there.
    envelope = Envelope(
        message_id=str(uuid.uuid4()),
        correlation_id=str(uuid.uuid4()),
        causation_id=str(uuid.uuid4()),
        saga="s",
        version=2,
        step="st",
        attempt=3,
        kind="command",
        type="t",
        payload={"nested": {"a": [1, 2]}},
        reply_to="q",
        sent_at=1.5,
        traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        slip=Slip(
            result=("r",),
            next=(
                SlipStep(
                    step="next",
                    participant="p",
                    type="do",
                    attempt=1,
                    message_id=str(uuid.uuid4()),
                    payload={"x": {"$result": ["st", "r"]}},
                    result=("y",),
                ),
            ),
            results={"before": {"z": 1}},
        ),
    )
    # JSON has lists where the dataclasses hold tuples.
    assert envelope.to_dict() == json.loads(json.dumps(dataclasses.asdict(envelope)))
    assert decode(encode(envelope, queue="q", actor="a")) == envelope
    bare = dataclasses.replace(envelope, traceparent=None, slip=None).to_dict()
    assert "traceparent" not in bare and "slip" not in bare


@pytest.mark.parametrize(
    ("slip", "reason"),
    [
        ([], "'slip' must be a JSON object"),
        ({"next": [], "extra": 1}, "unknown fields"),
        ({"results": {"s": 1}}, "must map step names to JSON objects"),
        ({"results": {"not a name": {}}}, "must map step names to JSON objects"),
        ({"next": {}}, "'slip.next' must be a list"),
        ({"next": [1]}, "must hold JSON objects"),
        ({"result": "r"}, "list of field names"),
        (
            {
                "next": [
                    {
                        "step": "s",
                        "participant": "p",
                        "type": "t",
                        "attempt": 0,
                        "message_id": str(uuid.uuid4()),
                    }
                ]
            },
            "'attempt' must be an integer",
        ),
        (
            {
                "next": [
                    {"step": "s", "participant": "p", "type": "t", "attempt": 1, "message_id": "x"}
                ]
            },
            "'message_id' is not a UUID",
        ),
        (
            {
                "next": [
                    {
                        "step": "s",
                        "participant": "p",
                        "type": "t",
                        "attempt": 1,
                        "message_id": str(uuid.uuid4()),
                        "payload": [],
                    }
                ]
            },
            "must be a JSON object",
        ),
        (
            {
                "next": [
                    {
                        "step": "s",
                        "participant": "p",
                        "type": "t",
                        "attempt": 1,
                        "message_id": str(uuid.uuid4()),
                        "who": 1,
                    }
                ]
            },
            "unknown fields",
        ),
    ],
)
def test_a_malformed_slip_is_refused_with_its_reason(slip: object, reason: str) -> None:
    data = envelope().to_dict()
    data["slip"] = slip
    with pytest.raises(MessageError, match=reason):
        envelope_from_dict(data)
