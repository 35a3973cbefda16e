"""The RabbitMQ broker participant workers use: dramatiq's, with two differences.

- A message whose JSON decodes but whose dramatiq fields have the wrong types (say
  ``"options": null``) would make dramatiq's consumer thread fail and restart forever,
  the message redelivered each time. The consumer here dead-letters it instead, as
  dramatiq does for a body that is not JSON.
- With a ``Topology``, queues are declared exactly as the relay declares them
  (outbox_relay.topology): needed for quorum queues, since RabbitMQ refuses a
  declaration whose arguments differ from the existing queue's.

Both reach into dramatiq's private RabbitMQ classes (dramatiq/brokers/rabbitmq.py),
the only place those behaviours live; tests/integration/test_participant_worker.py
covers them.
"""

from __future__ import annotations

from typing import Any

import structlog
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer
from dramatiq.common import xq_name

from outbox_relay.topology import Topology

log = structlog.get_logger(__name__)


def malformed(message: MessageProxy | Message[Any]) -> str | None:
    """Why dramatiq could not process this decoded message, or None if it can."""
    fields: dict[str, type | tuple[type, ...]] = {
        "queue_name": str,
        "actor_name": str,
        "args": tuple,
        "kwargs": dict,
        "options": dict,
        "message_id": str,
        "message_timestamp": (int, float),
    }
    for name, expected in fields.items():
        value = getattr(message, name)
        if not isinstance(value, expected) or isinstance(value, bool):
            return f"dramatiq field {name!r} has the wrong type ({type(value).__name__})"
    return None


class _CheckedConsumer(_RabbitmqConsumer):
    def __next__(self) -> MessageProxy | None:
        message: MessageProxy | None = super().__next__()  # type: ignore[no-untyped-call]
        if message is None:
            return None
        problem = malformed(message)
        if problem is None:
            return message
        log.error(
            "message_rejected",
            reason=problem,
            queue=self.queue_name,
            dead_letter_queue=xq_name(self.queue_name),
        )
        self.known_tags.discard(message._tag)
        self._nack(message._tag)  # type: ignore[no-untyped-call]
        return None


class ParticipantBroker(RabbitmqBroker):
    """dramatiq's RabbitmqBroker, dead-lettering malformed messages, and declaring its
    queues as ``topology`` says when one is given (else as dramatiq does)."""

    def __init__(self, *, topology: Topology | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.topology = topology

    @property
    def consumer_class(self) -> type[_RabbitmqConsumer]:
        return _CheckedConsumer

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        if self.topology is None:
            arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)  # type: ignore[no-untyped-call]
            return arguments
        return self._declared(queue_name)

    def _declare_xq_queue(self, queue_name: str) -> Any:
        if self.topology is None:
            return super()._declare_xq_queue(queue_name)  # type: ignore[no-untyped-call]
        xq = xq_name(queue_name)
        return self.channel.queue_declare(queue=xq, durable=True, arguments=self._declared(xq))

    def _declared(self, queue_name: str) -> dict[str, Any]:
        assert self.topology is not None
        for declaration in self.topology.declarations(queue_name):
            if declaration.name == queue_name:
                return dict(declaration.arguments)
        raise ValueError(f"the topology declares no queue {queue_name!r}")  # pragma: no cover
