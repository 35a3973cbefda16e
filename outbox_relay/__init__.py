"""outbox_relay: the outbox table, the message contract, and the relay that publishes it.

- ``table``: the ``sagabox.outbox`` table and ``OutboxWriter`` (rows written in the
  caller's transaction, NOTIFY debounced);
- ``message``: the wire contract (a dramatiq message whose argument is the envelope);
- ``relay``: the ``sagabox relay`` process's work (docs/relay.md), with ``store``
  (its SQL), ``topology`` (dramatiq-compatible queue declarations) and
  ``failpoints`` (fault injection for tests).

Exceptions (see ``outbox_relay.errors`` for the whole tree)::

    SagaboxError
    ├── MessageError         a message that does not follow the contract
    ├── RelayError           the relay cannot do its job
    └── ConfigurationError   a bad setting
"""

from __future__ import annotations

from outbox_relay.errors import ConfigurationError, MessageError, RelayError, SagaboxError
from outbox_relay.failpoints import Failpoints
from outbox_relay.relay import Relay, RelayConfig, check
from outbox_relay.table import NOTIFY_CHANNEL, OutboxWriter, OutgoingMessage, outbox
from outbox_relay.topology import QueueDeclaration, Topology

__all__ = [
    "NOTIFY_CHANNEL",
    "ConfigurationError",
    "Failpoints",
    "MessageError",
    "OutboxWriter",
    "OutgoingMessage",
    "QueueDeclaration",
    "Relay",
    "RelayConfig",
    "RelayError",
    "SagaboxError",
    "Topology",
    "check",
    "outbox",
]
