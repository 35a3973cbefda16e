"""The root of sagabox's exception tree, shared by every package.

    SagaboxError
    ├── MessageError                 a message that does not follow the contract (outbox_relay)
    ├── RelayError                   the relay cannot do its job (outbox_relay)
    ├── OrchestratorError            (orchestrator.errors)
    │   ├── DefinitionError          a saga definition failed validation at registration
    │   ├── UnknownSagaError         no such saga name / version, or no such saga instance
    │   ├── InvalidInputError        saga data that does not match the definition's input
    │   ├── IdempotencyConflictError a start key reused with different data
    │   └── StoreError               the state store failed (wraps the driver's error)
    ├── ParticipantError             (participants.errors)
    └── ConfigurationError           a bad setting, named with its environment variable

It lives here, in the lowest package, because every other package may import
outbox_relay (the message contract and the outbox table) and nothing else.
"""

from __future__ import annotations


class SagaboxError(Exception):
    """Base class of every error sagabox raises on purpose."""


class ConfigurationError(SagaboxError):
    """A setting is missing or malformed; the message names the environment variable."""


class MessageError(SagaboxError):
    """A message on the wire does not follow the contract (docs/messages.md)."""


class RelayError(SagaboxError):
    """The relay cannot publish (broker or database unreachable after retries)."""
