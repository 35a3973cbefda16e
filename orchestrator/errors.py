"""The orchestrator's exceptions (the whole tree is drawn in outbox_relay/errors.py).

Business failures are values (a 'failed' reply, a compensated saga), never these.
"""

from __future__ import annotations

from collections.abc import Sequence

from outbox_relay.errors import SagaboxError


class OrchestratorError(SagaboxError):
    """Base class of the orchestrator's errors."""


class DefinitionError(OrchestratorError):
    """A saga definition failed validation; ``problems`` lists each, naming its step."""

    def __init__(self, saga: str, problems: Sequence[str]) -> None:
        self.saga = saga
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"saga {saga!r} is not valid:\n{lines}")


class UnknownSagaError(OrchestratorError):
    """No saga definition with that name / version, or no saga instance with that id."""


class InvalidInputError(OrchestratorError):
    """Saga data that does not match the definition's declared input."""


class IdempotencyConflictError(OrchestratorError):
    """A start idempotency key was reused with different data."""


class StoreError(OrchestratorError):
    """The state store failed; the driver's error is the cause."""


class OperatorActionError(OrchestratorError):
    """An operator action (retry, skip, abort, resume) that does not fit the saga:
    nothing was changed."""


class WaitTimeoutError(OrchestratorError):
    """A saga did not settle (completed, compensated or failed) within the wait's timeout."""
