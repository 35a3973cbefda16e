"""Finds the user's saga Registry from a ``module:attribute`` reference."""

from __future__ import annotations

import importlib

from orchestrator.registry import Registry
from outbox_relay.errors import ConfigurationError


def load_registry(reference: str) -> Registry:
    module_name, _, attribute = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigurationError(f"SAGABOX_SAGAS: cannot import {module_name!r}: {e}") from e
    value = getattr(module, attribute, None)
    if callable(value) and not isinstance(value, Registry):
        value = value()
    if not isinstance(value, Registry):
        raise ConfigurationError(f"SAGABOX_SAGAS: {reference} is not a Registry")
    return value
