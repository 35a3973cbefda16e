"""The inbox's vocabulary and the interface the handling engine needs from a store.

One row per (saga id, step, action). ``action`` is 'command' or 'compensation';
``status`` is 'done', or 'tombstone' for a command row written by a compensation
that came first (cancel-before-do). Every row carries the reply it produced, so a
duplicate gets the same answer without running anything again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from outbox_relay.message import Envelope, ReplyType
from participants.context import Action

Status = Literal["done", "tombstone"]


@dataclass(frozen=True, slots=True)
class InboxKey:
    saga_id: str
    step: str
    action: Action


@dataclass(frozen=True, slots=True)
class StoredReply:
    """The reply type and payload an inbox row answers with, whatever the attempt."""

    type: ReplyType
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InboxEntry:
    message_id: str
    status: Status
    reply: StoredReply


# What a tombstone answers to the late command it stands for.
CANCELLED = StoredReply("cancelled", {"reason": "compensated before the command arrived"})


class Inbox(Protocol):
    """The store operations of one transaction (store.PostgresInbox, testing.MemoryInbox)."""

    def claim(
        self,
        key: InboxKey,
        message_id: str,
        *,
        status: Status = "done",
        reply: StoredReply | None = None,
    ) -> InboxEntry | None:
        """Insert the row and return None, or return the existing row, locked until commit.

        A concurrent transaction holding the same key makes this wait until it ends. A
        worker's inbox may claim late instead (store.PostgresInbox.late): it returns None
        and inserts the row with the reply (``send``), where a key already there fails
        the transaction, which the worker then redoes claiming first.
        """
        ...

    def release(self, key: InboxKey) -> None:
        """Drop a row claimed in this transaction, so that a later attempt runs afresh."""
        ...

    def savepoint(self, *, always: bool = False) -> AbstractContextManager[object]:
        """A nested transaction around the business logic, rolled back if it raises.

        An optimistic inbox runs without one (a refusal raises SavepointNeeded),
        unless ``always``.
        """
        ...

    def send(
        self,
        reply: Envelope,
        destination: str,
        *,
        records: Sequence[tuple[InboxKey, StoredReply]] = (),
    ) -> None:
        """Add the reply, bound for queue ``destination``, to the outbox in this transaction.

        Also store each of ``records`` (a reply) on the row claimed under its key: the
        message's own, and those of the steps of a routing slip handled here before it.
        """
        ...
