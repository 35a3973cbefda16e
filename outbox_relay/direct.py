"""Direct publishing: a consumer publishes the outbox rows its own transactions leased
to it, right after their commit, on a confirm-mode channel of its consuming connection.

The participants' batch worker publishes its replies this way, the orchestrator its
commands. The relay stays the safety net: a row is written leased to its writer for a
while (``OutboxWriter.lease``), deleted once RabbitMQ confirms it, handed back to the
relay at once if RabbitMQ refuses it (nack, or a mandatory publish returned), and taken
by a relay when its lease ends unpublished (the process died, the connection was lost).
docs/relay.md, "Direct publishing", has the design and the guarantees.

One thread owns a publisher and its writers: the consumer's, which writes the rows,
publishes them, takes the confirms and sweeps.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from pika.channel import Channel
from pika.spec import Basic, BasicProperties
from sqlalchemy import Connection, Engine

from outbox_relay.table import OutboxWriter, OutgoingMessage

log = structlog.get_logger(__name__)

CONFIRMED, REFUSED = "confirmed", "refused"


@dataclass(frozen=True, slots=True)
class Source:
    """A writer whose leased rows a publisher publishes: its name (logs, metrics) and
    the engine of the database its rows are in."""

    name: str
    writer: OutboxWriter
    engine: Engine


class DirectPublisher:
    """Publishes its sources' committed leased rows and settles them once confirmed.

    ``publish`` after each commit (before the consumer's ack: a reply is not lost to a
    crash between the two, its row is still leased); ``on_confirm`` / ``on_return`` are
    the confirm channel's callbacks; ``sweep`` deletes the confirmed rows and releases
    the refused ones in a transaction of its own (a caller's transaction may take them
    along: ``OutboxWriter.direct.sweep``); ``reset`` when the connection is lost.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        counted: Callable[[str, str], None] | None = None,
        *,
        hold: bool = False,
    ) -> None:
        self.sources = list(sources)
        # Called with (source name, CONFIRMED or REFUSED) per message: a metric.
        self.counted = counted or (lambda _name, _outcome: None)
        # Whether ``sweep`` keeps a connection per source between sweeps (until
        # ``close``): for a publisher whose every sweep runs on its own, the pool's
        # checkout and checkin cost about as much CPU as the DELETE.
        self.hold = hold
        self._held: dict[str, Connection] = {}
        self._unconfirmed: dict[int, tuple[Source, int, OutgoingMessage]] = {}
        self._returned: set[str] = set()
        self._published = 0

    def publish(self, channel: Channel | None) -> None:
        """Publish the committed leased rows of every source on ``channel`` (in confirm
        mode); with no channel yet, they wait for the next call."""
        if channel is None:
            return
        for source in self.sources:
            direct = source.writer.direct
            for row_id, m in direct.ready:
                channel.basic_publish(
                    m.exchange,
                    m.destination,
                    m.body,
                    BasicProperties(
                        delivery_mode=2,
                        message_id=m.message_id,
                        correlation_id=m.correlation_id,
                        content_type="application/json",
                        headers=dict(m.headers) if m.headers is not None else None,
                    ),
                    # Returned if no queue takes it: then the relay's, which declares it.
                    mandatory=True,
                )
                self._published += 1
                self._unconfirmed[self._published] = (source, row_id, m)
            direct.ready.clear()

    def on_confirm(self, method: Basic.Ack | Basic.Nack) -> None:
        tag = int(method.delivery_tag)
        tags = [t for t in self._unconfirmed if t <= tag] if method.multiple else [tag]
        acked = isinstance(method, Basic.Ack)
        published: list[OutgoingMessage] = []
        for t in tags:
            entry = self._unconfirmed.pop(t, None)
            if entry is None:
                continue
            source, row_id, m = entry
            if acked and m.message_id not in self._returned:
                source.writer.direct.confirmed(row_id)
                self.counted(source.name, CONFIRMED)
                published.append(m)
            else:
                # The relay retries a nacked row with backoff and parks a returned one
                # it cannot route either.
                self._returned.discard(m.message_id)
                source.writer.direct.refused(row_id)
                self.counted(source.name, REFUSED)
                log.warning(
                    "direct_publish_refused",
                    message_id=m.message_id,
                    correlation_id=m.correlation_id,
                    reason="returned" if acked else "nacked",
                )
        if published and _info_enabled():
            # As the relay's line for a batch: `sagabox trace` finds a saga's here too.
            log.info(
                "outbox_batch_published",
                count=len(published),
                direct=True,
                message_ids=[m.message_id for m in published],
                correlation_ids=[m.correlation_id for m in published],
            )

    def on_return(
        self, _: Channel, method: Basic.Return, properties: BasicProperties, __: bytes
    ) -> None:
        # A returned message is acked after its return: tell them apart by message id.
        if properties.message_id:
            self._returned.add(str(properties.message_id))

    def sweep(self) -> None:
        """Delete the confirmed rows and hand the refused ones to the relay: each
        statement commits on its own (both can be repeated, neither needs the other),
        one round trip each rather than three in a transaction."""
        for source in self.sources:
            direct = source.writer.direct
            if not direct.unswept:
                continue
            try:
                conn = self._held.get(source.name) or self._connect(source)
                try:
                    for sql, params in direct.sweep():
                        conn.exec_driver_sql(sql, params)
                finally:
                    if not self.hold:
                        conn.close()
            except Exception as e:
                # Left for the next sweep; past their lease, a relay publishes them again.
                direct.rolled_back()
                self._release(source.name)
                log.warning("direct_sweep_failed", source=source.name, error=repr(e))
            else:
                direct.swept()

    def _connect(self, source: Source) -> Connection:
        conn = source.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        if self.hold:
            self._held[source.name] = conn
        return conn

    def close(self) -> None:
        """Give back the connections ``hold`` kept."""
        for name in list(self._held):
            self._release(name)

    def _release(self, name: str) -> None:
        conn = self._held.pop(name, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def owed(self) -> bool:
        """Whether confirms are still to come (a stopping consumer waits for them)."""
        return bool(self._unconfirmed)

    def reset(self) -> None:
        """The connection is gone: unconfirmed rows stay leased, and a relay publishes
        them once their lease ends (a duplicate if RabbitMQ had them: the inboxes
        absorb it)."""
        self._unconfirmed.clear()
        self._returned.clear()
        self._published = 0


def _info_enabled() -> bool:
    """Whether info lines are written: asked before building a line's id lists."""
    enabled = getattr(log, "is_enabled_for", None)
    return enabled is None or bool(enabled(logging.INFO))
