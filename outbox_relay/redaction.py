"""Masking secrets and card numbers before they are logged, stored or sent (pure).

Two rules, applied by ``redact`` to any JSON-like value:

- a value under a sensitive key (a key one of whose words is password, secret, token,
  card, cvv, pan, authorization, ...; case-insensitive, at any depth) becomes
  ``[REDACTED]``;
- in every string, a run of 13 to 19 digits (single spaces or dashes allowed between
  them; not glued to letters, not part of a UUID) that passes the Luhn check becomes
  ``[REDACTED-PAN]``.

It lives here, beside the message contract, so that the orchestrator, the participant
SDK and sagabox's log processor share it without importing each other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "[REDACTED]"
PAN_MASK = "[REDACTED-PAN]"

SENSITIVE_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "token",
        "card",
        "cvv",
        "cvc",
        "pan",
        "authorization",
        "apikey",
        "cookie",
    }
)

# Digits with single separators, not glued to letters or digits (so that runs inside
# hex ids and hashes are left alone); the groups of a match are tried as card numbers.
_DIGIT_RUN = re.compile(r"(?<![0-9A-Za-z])\d(?:[ -]?\d)+(?![0-9A-Za-z])")
# UUIDs (message and saga ids) are skipped whole: their all-digit groups could add up.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_GROUP = re.compile(r"\d+")
_WORD = re.compile(r"[a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
MIN_PAN, MAX_PAN = 13, 19
UUID_LENGTH = 36


def luhn_valid(digits: str) -> bool:
    """True when ``digits`` (digits only) passes the Luhn checksum."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def is_sensitive_key(key: object) -> bool:
    """True for keys like ``password``, ``card_number``, ``X-Auth-Token``, ``apiKey``."""
    if not isinstance(key, str):
        return False
    words = _WORD.findall(_CAMEL.sub("_", key).lower())
    return any(word in SENSITIVE_WORDS for word in words) or "".join(words) in SENSITIVE_WORDS


def _mask_run(match: re.Match[str]) -> str:
    text = match.group(0)
    groups = [(g.start(), g.end(), g.group(0)) for g in _GROUP.finditer(text)]
    out: list[str] = []
    position = 0
    i = 0
    while i < len(groups):
        found = None
        # The longest sequence of whole groups starting at i that is a card number.
        for j in range(len(groups), i, -1):
            digits = "".join(g[2] for g in groups[i:j])
            if MIN_PAN <= len(digits) <= MAX_PAN and luhn_valid(digits):
                found = j
                break
            if len(digits) < MIN_PAN:
                break
        if found is None:
            i += 1
            continue
        start, end = groups[i][0], groups[found - 1][1]
        out.append(text[position:start])
        out.append(PAN_MASK)
        position = end
        i = found
    out.append(text[position:])
    return "".join(out)


def redact_text(text: str) -> str:
    """``text`` with every Luhn-valid 13-19 digit run replaced by ``[REDACTED-PAN]``."""
    if len(text) < MIN_PAN:
        return text
    if len(text) == UUID_LENGTH and _UUID.fullmatch(text):
        # The common case of an id field; the relay logs a thousand per batch.
        return text
    out: list[str] = []
    position = 0
    for uuid in _UUID.finditer(text):
        out.append(_DIGIT_RUN.sub(_mask_run, text[position : uuid.start()]))
        out.append(uuid.group(0))
        position = uuid.end()
    out.append(_DIGIT_RUN.sub(_mask_run, text[position:]))
    return "".join(out)


def redact(value: Any) -> Any:
    """A copy of ``value`` (dicts, lists, tuples, strings) with secrets and cards masked."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            k: (MASK if is_sensitive_key(k) and v is not None else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(item) for item in value)
    return value
