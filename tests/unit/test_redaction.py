"""The pure masking of secrets and card numbers (outbox_relay.redaction)."""

from __future__ import annotations

import pytest

from outbox_relay.redaction import MASK, PAN_MASK, is_sensitive_key, luhn_valid, redact, redact_text

CARD = "4111 1111 1111 1111"


@pytest.mark.parametrize(
    "digits", ["4111111111111111", "5500000000000004", "378282246310005", "4000056655665556"]
)
def test_known_test_cards_pass_luhn(digits: str) -> None:
    assert luhn_valid(digits)


@pytest.mark.parametrize(
    "text",
    [
        f"card {CARD} refused",
        "card 4111-1111-1111-1111 refused",
        "card 4111111111111111 refused",
        "amount 100 4111111111111111",
        "card:4111111111111111.",
        "(4111-1111-1111-1111)",
        "{'card_no': '378282246310005'}",
    ],
)
def test_luhn_valid_digit_runs_are_masked_anywhere_in_text(text: str) -> None:
    masked = redact_text(text)
    assert PAN_MASK in masked
    digits = "".join(c for c in masked if c.isdigit())
    assert "4111111111111111" not in digits and "378282246310005" not in digits


@pytest.mark.parametrize(
    "text",
    [
        "order 1234567890123456 is not a card",  # fails Luhn
        "42 items at 1700000000",  # too short
        "id 123456789012345678901234",  # too long
        "2026-11-23T16:10:00.123456Z",
        "b3c1a7e2-5d1f-4c1e-9a51-0c6fd1a4e2b7",
        # A UUID whose digit groups add up to a Luhn-valid run (seen in a real log).
        "58a02771-a83b-46e1-4111-111111111111",
        "12345678-1234-1234-4111-111111111111",
        # Inside hex ids and hashes.
        "sha e3b0c4411111111111111111aef",
    ],
)
def test_other_numbers_are_left_alone(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "Password",
        "db_password",
        "client_secret",
        "X-Auth-Token",
        "card",
        "cardNumber",
        "CVV",
        "pan",
        "Authorization",
        "api_key",
        "apiKey",
    ],
)
def test_sensitive_keys(key: str) -> None:
    assert is_sensitive_key(key)


@pytest.mark.parametrize("key", ["company", "span", "expand", "event", "correlation_id", "step"])
def test_ordinary_keys(key: str) -> None:
    assert not is_sensitive_key(key)


def test_redact_walks_nested_dicts_and_lists_without_mutating() -> None:
    value = {
        "user": "alice",
        "Password": "hunter2",
        "items": [{"cardNumber": "tok_x"}, {"note": f"paid with {CARD}"}, ("a", CARD)],
        "headers": {"authorization": "Bearer abc"},
        "count": 3,
    }
    masked = redact(value)
    assert masked == {
        "user": "alice",
        "Password": MASK,
        "items": [{"cardNumber": MASK}, {"note": f"paid with {PAN_MASK}"}, ("a", PAN_MASK)],
        "headers": {"authorization": MASK},
        "count": 3,
    }
    assert value["Password"] == "hunter2"
