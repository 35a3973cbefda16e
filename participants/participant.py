"""A participant service: a queue name and the commands and compensations it answers.

    inventory = Participant("inventory")

    @inventory.command("reserve_stock", compensation="release_stock")
    def reserve(session: Session, payload: Payload, ctx: Context) -> dict[str, Any]:
        ...                    # returns the result, or raises BusinessFailure("out of stock")

    @inventory.compensation("release_stock")
    def release(session: Session, payload: Payload, ctx: Context) -> None:
        ...

Declaring does not touch a broker or a database: the entry point binds the
participant to both (``inventory.bind(broker, engine)``, see participants.worker).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session

from outbox_relay import tracing
from outbox_relay.message import Envelope, envelope_from_dict, is_valid_name
from outbox_relay.roundtrips import Tail
from outbox_relay.table import OutboxWriter
from participants import handling
from participants.context import Action, CommandFn, CompensationFn, Handler
from participants.errors import DefinitionError
from participants.inbox import Inbox
from participants.store import PostgresInbox

if TYPE_CHECKING:
    from dramatiq import Broker
    from sqlalchemy.engine import Engine

    from participants.worker import Binding, RetryPolicy

CommandT = TypeVar("CommandT", bound=CommandFn)
CompensationT = TypeVar("CompensationT", bound=CompensationFn)


class Participant:
    """The handlers of one service; ``name`` is the queue its commands arrive on."""

    def __init__(self, name: str) -> None:
        if not is_valid_name(name):
            raise DefinitionError(f"participant name {name!r} is not a valid queue name")
        self.name = name
        self.handlers: dict[str, Handler] = {}

    def __repr__(self) -> str:
        return f"Participant({self.name!r}, handlers={sorted(self.handlers)})"

    def command(
        self, name: str, *, compensation: str | None = None
    ) -> Callable[[CommandT], CommandT]:
        """Declare the handler of command ``name`` and the compensation that undoes it."""

        def decorate(fn: CommandT) -> CommandT:
            self._add(Handler(name, "command", fn, compensation))
            return fn

        return decorate

    def compensation(self, name: str) -> Callable[[CompensationT], CompensationT]:
        """Declare the handler of compensation ``name`` (named by a command's ``compensation``)."""

        def decorate(fn: CompensationT) -> CompensationT:
            self._add(Handler(name, "compensation", fn))
            return fn

        return decorate

    def validate(self) -> None:
        """Check that every compensation a command names has a handler, and vice versa."""
        named = {h.compensation for h in self.handlers.values() if h.compensation is not None}
        declared = self._names("compensation")
        if missing := named - declared:
            raise DefinitionError(f"{self.name}: no handler for compensation(s) {sorted(missing)}")
        if orphans := declared - named:
            raise DefinitionError(
                f"{self.name}: compensation(s) {sorted(orphans)} undo no declared command"
            )

    def handle(
        self,
        session: Session,
        message: Envelope | Mapping[str, Any],
        *,
        inbox: Inbox | None = None,
        writer: OutboxWriter | None = None,
        optimistic: bool = False,
        tail: Tail | None = None,
    ) -> Envelope:
        """Handle one command or compensation in ``session``'s transaction; return the reply.

        The caller commits. ``message`` is an Envelope or the dict a dramatiq actor
        receives. Raises MessageError for a message this participant cannot take.

        ``optimistic`` runs the handler without a savepoint; if it refuses, this raises
        SavepointNeeded and the caller rolls back and calls again without it.
        ``tail``: the outgoing statement is held there, for the caller to send with its
        COMMIT (``tail.commit(session)``) instead of running now.
        """
        envelope = message if isinstance(message, Envelope) else envelope_from_dict(message)
        store = (
            inbox
            if inbox is not None
            else PostgresInbox(session, writer, optimistic=optimistic, tail=tail)
        )
        # A child of the saga's caller's trace: the handler's work shows up in it.
        with tracing.span(
            f"{self.name} {envelope.kind} {envelope.type}",
            envelope.traceparent,
            kind="consumer",
            attributes={
                "sagabox.participant": self.name,
                "sagabox.saga_id": envelope.correlation_id,
                "sagabox.saga": envelope.saga,
                "sagabox.step": envelope.step,
                "sagabox.attempt": envelope.attempt,
                "messaging.message.id": envelope.message_id,
            },
        ):
            return handling.handle(self.name, self.handlers, session, envelope, store)

    def bind(
        self, broker: Broker, engine: Engine, *, retries: RetryPolicy | None = None
    ) -> Binding:
        """Declare this participant's dramatiq actors on ``broker``, handling in ``engine``."""
        # Imported here because participants.worker imports this module.
        from participants.worker import bind  # noqa: PLC0415

        return bind(self, broker, engine, retries=retries)

    def _add(self, handler: Handler) -> None:
        if not is_valid_name(handler.name):
            raise DefinitionError(f"{handler.name!r} is not a valid command name")
        if handler.name in self.handlers:
            raise DefinitionError(f"{self.name}: {handler.name!r} is declared twice")
        self.handlers[handler.name] = handler

    def _names(self, action: Action) -> set[str]:
        return {h.name for h in self.handlers.values() if h.action == action}
