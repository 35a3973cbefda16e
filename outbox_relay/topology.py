"""The RabbitMQ queues behind a destination, declared exactly as dramatiq does.

A destination is a dramatiq queue name, published to through the default
exchange. dramatiq's RabbitmqBroker declares three queues per name
(``_declare_queue``, ``_declare_dq_queue``, ``_declare_xq_queue`` in
dramatiq/brokers/rabbitmq.py); we declare the same with the same arguments, so
whichever of the relay and a worker comes first, the other's declaration is a
no-op instead of a PRECONDITION_FAILED channel error.

With ``quorum=True`` the three are quorum queues (for a RabbitMQ cluster), with
``x-delivery-limit`` so that a message that keeps crashing its consumer ends in
the dead-letter queue instead of looping. Participants must then declare their
queues with the same arguments (docs/relay.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# dramatiq's DEAD_MESSAGE_TTL default: dead-lettered messages are kept for 7 days.
DEAD_MESSAGE_TTL_MS = 86_400_000 * 7
DEFAULT_DELIVERY_LIMIT = 20


@dataclass(frozen=True, slots=True)
class QueueDeclaration:
    """One durable queue to declare: its name and x-arguments."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Topology:
    """How the relay declares the queues of each destination."""

    quorum: bool = False
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    dead_message_ttl_ms: int = DEAD_MESSAGE_TTL_MS

    def declarations(self, destination: str) -> list[QueueDeclaration]:
        """The queues dramatiq declares for ``destination``: q, q.DQ and q.XQ."""
        base = canonical_name(destination)
        dead_letter: dict[str, Any] = {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": f"{base}.XQ",
        }
        xq: dict[str, Any] = {"x-message-ttl": self.dead_message_ttl_ms}
        if self.quorum:
            dead_letter |= {"x-queue-type": "quorum", "x-delivery-limit": self.delivery_limit}
            xq |= {"x-queue-type": "quorum"}
        return [
            QueueDeclaration(base, dead_letter),
            QueueDeclaration(f"{base}.DQ", dict(dead_letter)),
            QueueDeclaration(f"{base}.XQ", xq),
        ]


def canonical_name(queue_name: str) -> str:
    """dramatiq's q_name: the base queue of a delay (.DQ) or dead-letter (.XQ) queue."""
    if queue_name.endswith((".DQ", ".XQ")):
        return queue_name[:-3]
    return queue_name
