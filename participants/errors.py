"""The participants SDK's exceptions, under sagabox's root (outbox_relay.errors).

    SagaboxError
    └── ParticipantError
        ├── BusinessFailure      raised by a handler: refused for a business reason;
        │                        becomes a stored 'failed' (or 'compensation_failed') reply
        ├── SavepointNeeded      a BusinessFailure in a transaction run without a savepoint:
        │                        roll it back and handle the message again with one
        └── DefinitionError      a participant's handlers are declared inconsistently

Anything else a handler raises is technical: the transaction is rolled back and
dramatiq retries the message. A message that does not follow the contract raises
outbox_relay's MessageError and is dead-lettered at once.
"""

from __future__ import annotations

from outbox_relay.errors import SagaboxError


class ParticipantError(SagaboxError):
    """Base class of the participants SDK's errors."""


class BusinessFailure(ParticipantError):
    """A handler refuses the command for a business reason (out of stock, ...).

    Not a crash: the handler's effects are rolled back to the savepoint, the inbox
    row and the 'failed' reply are kept, and the message is acknowledged.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SavepointNeeded(ParticipantError):
    """A handler refused, in a transaction handled without a savepoint (``optimistic``).

    Its effects cannot be undone alone: the caller rolls the whole transaction back and
    handles the message again with a savepoint. Handlers succeed far more often than
    they refuse, so the common path saves the SAVEPOINT and RELEASE round trips.
    """


class DefinitionError(ParticipantError):
    """A participant's commands and compensations do not fit together."""
