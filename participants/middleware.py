"""The dramatiq middleware every bound participant gets (one instance per broker).

- binds the saga's correlation id, message id, ... with structlog contextvars while a
  message is handled, and clears them afterwards;
- rejects a message whose envelope is invalid before its actor runs: it goes to the
  dead-letter queue (``<queue>.XQ``) at once, with no retries;
- logs every dead-lettered message and, best effort, replies 'error' so the
  orchestrator need not wait for the step's timeout.

Bodies that are not JSON never reach a middleware: dramatiq's RabbitMQ consumer logs
"Failed to decode message" and dead-letters them itself; participants.broker does the
same for JSON whose dramatiq fields have the wrong types.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import structlog
from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.common import xq_name
from dramatiq.errors import ActorNotFound
from dramatiq.middleware import SkipMessage
from prometheus_client import Counter
from structlog.contextvars import bind_contextvars, bound_contextvars, unbind_contextvars

from outbox_relay.errors import MessageError
from outbox_relay.message import Envelope
from outbox_relay.redaction import redact_text
from participants.context import CONTEXT_KEYS, log_context

if TYPE_CHECKING:
    from participants.worker import Binding

log = structlog.get_logger(__name__)

DEAD_LETTERED = Counter(
    "sagabox_participant_dead_lettered",
    "Messages dead-lettered to <queue>.XQ: rejected (broke the contract) or exhausted"
    " (technical failures past the retries)",
    ["participant", "reason"],
)

REDELIVERED = Counter(
    "sagabox_participant_redelivered",
    "Messages RabbitMQ delivered again after an earlier delivery was never acked",
    ["participant"],
)


class _Parsed(threading.local):
    """The envelope before_process_message parsed, for the actor to take on this thread.

    dramatiq calls the middleware and then the actor on the same worker thread with the
    same argument objects, so the actor need not parse and validate the envelope again.
    """

    raw: object = None
    envelope: Envelope | None = None

    def take(self, raw: object) -> Envelope | None:
        envelope = self.envelope if raw is self.raw else None
        self.raw = self.envelope = None
        return envelope


parsed = _Parsed()


def _log_rejected(binding: Binding, message: MessageProxy, reason: str, **extra: Any) -> None:
    log.error(
        "message_rejected",
        service=binding.participant.name,
        message_id=message.message_id,
        queue=message.queue_name,
        actor=message.actor_name,
        reason=reason,
        **extra,
    )


class Rejected(SkipMessage):
    """Raised by the middleware to dead-letter a message that breaks the contract."""


def reject(binding: Binding, message: MessageProxy, error: MessageError) -> Rejected:
    """Log and count a message whose envelope breaks the contract, and fail it: it is
    nacked, and RabbitMQ moves it to ``<queue>.XQ``. Returns the exception that says so."""
    _log_rejected(binding, message, str(error), dead_letter_queue=xq_name(message.queue_name))
    message.fail()
    DEAD_LETTERED.labels(binding.participant.name, "rejected").inc()
    rejected = Rejected(str(error))
    message.stuff_exception(rejected)
    return rejected


def redelivered(binding: Binding) -> None:
    """A delivery RabbitMQ made before was never acked: the inbox decides."""
    log.info("message_redelivered")
    REDELIVERED.labels(binding.participant.name).inc()


class ParticipantMiddleware(Middleware):
    """Message context, early rejection and dead-letter reporting for bound participants."""

    def __init__(self) -> None:
        self.by_actor: dict[str, Binding] = {}
        self.by_queue: dict[str, Binding] = {}

    def add(self, binding: Binding) -> None:
        for name in binding.participant.handlers:
            self.by_actor[name] = binding
        self.by_queue[binding.participant.name] = binding

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        binding = self.by_actor.get(message.actor_name)
        if binding is None:
            return
        try:
            envelope = binding.parse(message.args, message.kwargs)
        except MessageError as e:
            raise reject(binding, message, e) from e
        parsed.raw, parsed.envelope = message.args[0], envelope
        bind_contextvars(**log_context(binding.participant.name, envelope))
        if getattr(message, "redelivered", False):
            redelivered(binding)

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        parsed.take(None)
        unbind_contextvars(*CONTEXT_KEYS)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        unbind_contextvars(*CONTEXT_KEYS)

    def before_nack(self, broker: Broker, message: MessageProxy) -> None:
        binding = self.by_queue.get(message.queue_name)
        if binding is None:
            return
        exception = message._exception
        if isinstance(exception, Rejected):
            return  # rejected in before_process_message, already logged
        rejected = isinstance(exception, ActorNotFound | MessageError)
        DEAD_LETTERED.labels(
            binding.participant.name, "rejected" if rejected else "exhausted"
        ).inc()
        try:
            envelope = binding.parse(message.args, message.kwargs, resolve_handler=False)
        except MessageError as e:
            _log_rejected(binding, message, f"{_describe(exception)}; {e}")
            return
        with bound_contextvars(**log_context(binding.participant.name, envelope)):
            if rejected:
                log.error(
                    "message_rejected",
                    reason=_describe(exception),
                    queue=message.queue_name,
                    actor=message.actor_name,
                )
            else:
                log.error(
                    "command_dead_lettered",
                    error=_describe(exception),
                    # dramatiq counts every failed delivery, the first one included.
                    failed_deliveries=message.options.get("retries"),
                    dead_letter_queue=xq_name(message.queue_name),
                )
            binding.reply_failure(envelope, _describe(exception))


def _describe(exception: BaseException | None) -> str:
    if exception is None:
        return "failed"
    if isinstance(exception, ActorNotFound):
        return f"unknown actor: {exception}"
    # Sent back to the orchestrator and logged: never with a card number in it.
    return redact_text(f"{type(exception).__name__}: {exception}"[:1000])
