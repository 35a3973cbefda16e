"""Binding participants to a dramatiq broker and a database, and running a worker.

Library code never calls ``dramatiq.set_broker``: an entry point builds the broker
and the engine, then binds each participant:

    broker = RabbitmqBroker(url=amqp_url)
    engine = create_engine(database_url)
    inventory.bind(broker, engine, retries=RetryPolicy(max_retries=5))
    broker.add_middleware(InboxPurge(engine, retention=timedelta(days=7)))

``run`` does all of that and runs a dramatiq Worker until told to stop; it is what
``sagabox participant MODULE`` runs in each of its processes.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog
from dramatiq import Actor, Broker, Middleware, Worker
from dramatiq.middleware import Retries
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from structlog.contextvars import bound_contextvars

from outbox_relay import roundtrips
from outbox_relay.errors import MessageError
from outbox_relay.failpoints import NO_FAILPOINTS, Failpoints
from outbox_relay.message import Envelope, envelope_from_dict
from outbox_relay.pooling import check_on_checkout
from outbox_relay.redaction import redact_text
from outbox_relay.table import OutboxWriter
from outbox_relay.topology import DEFAULT_DELIVERY_LIMIT, Topology
from participants.batching import BatchWorker
from participants.broker import ParticipantBroker
from participants.errors import DefinitionError, SavepointNeeded
from participants.handling import on_commit, resolve
from participants.middleware import ParticipantMiddleware, parsed
from participants.participant import Participant
from participants.replies import reply_to, technical_failure
from participants.store import (
    LateClaims,
    PostgresInbox,
    claim_conflict,
    claim_late,
    purge_inbox,
    reserve,
    rollback_keeping_prepared,
)

log = structlog.get_logger(__name__)

DEFAULT_RETENTION = timedelta(days=7)
WORKERS = ("batch", "threads")
PUBLISHERS = ("relay", "direct")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """dramatiq's Retries options for a participant's actors (backoffs in milliseconds)."""

    max_retries: int = 5
    min_backoff_ms: int = 1000
    max_backoff_ms: int = 300_000

    def actor_options(self) -> dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "min_backoff": self.min_backoff_ms,
            "max_backoff": self.max_backoff_ms,
            # A message that breaks the contract will not get better: dead-letter it now.
            "throws": (MessageError,),
        }


@dataclass
class Binding:
    """A participant bound to a broker and a database: its actors and how they handle."""

    participant: Participant
    broker: Broker
    engine: Engine
    writer: OutboxWriter = field(default_factory=OutboxWriter)
    # Tests arm participant.before_commit / participant.after_commit_before_ack: a crash
    # before the commit must apply nothing, one after it must apply nothing twice.
    failpoints: Failpoints = NO_FAILPOINTS
    actors: dict[str, Actor[..., None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A refusal's redo runs handlers in savepoints: each one round trip, not three;
        # and a batch's BEGIN rides with its first statement.
        roundtrips.hold(self.engine)

    def parse(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], *, resolve_handler: bool = True
    ) -> Envelope:
        """The envelope a dramatiq message carries, or MessageError saying why not."""
        if kwargs or len(args) != 1:
            raise MessageError("a sagabox message has exactly one argument, the envelope")
        envelope = envelope_from_dict(args[0])
        if resolve_handler:
            resolve(self.participant.handlers, envelope)
        return envelope

    def process(self, *args: Any, **kwargs: Any) -> None:
        """The body of every actor: one transaction per message."""
        envelope = None
        if len(args) == 1 and not kwargs:
            envelope = parsed.take(args[0])
        if envelope is None:
            envelope = self.parse(args, kwargs)
        self.apply([envelope])
        # dramatiq acks once this returns (after the middleware's after-hooks).
        self.failpoints("participant.after_commit_before_ack")

    def apply(
        self,
        envelopes: Sequence[Envelope],
        contexts: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Handle ``envelopes`` in one transaction, or raise and apply none of them.

        Handlers run without a savepoint first; one that refuses (BusinessFailure) needs
        one to keep its inbox row and 'failed' reply while its effects are undone, so the
        transaction is rolled back and redone, with a savepoint for that envelope and
        every one after it: refusals come with the workload (declined payments), and a
        redo per refusal would run a batch's first handlers again and again. The
        batch's inbox keys are claimed late: each command's row is inserted with its
        reply, in the reply's statement (``PostgresInbox.late``). A key already there
        (a duplicate, a command cancelled by its compensation) fails that insert; the
        transaction is then rolled back and redone with the keys claimed first, in
        one statement (``store.reserve``), so that a duplicate runs nothing. Any other
        database error is redone that way too, once, before it is raised.
        ``contexts``: the log context of each envelope, bound while it is handled.
        """
        savepoints: set[int] = set()
        # Not with a slip's step to be handled here next: its savepoint would carry the
        # claims of the step before it, and a duplicate's failure would read as its own.
        late: LateClaims | None = None if self._local_slip(envelopes) else {}
        while True:
            index = 0
            if late is not None:
                late.clear()
            try:
                with on_commit() as committed:
                    with (
                        Session(self.engine) as session,
                        session.begin(),
                        # BEGIN goes with the first statement, not as a round trip
                        # of its own (outbox_relay.roundtrips).
                        roundtrips.opening(
                            session.connection(execution_options=roundtrips.AUTOCOMMIT)
                        ) as tail,
                    ):
                        # Confirmed rows deleted ahead of the handlers' inserts: a
                        # saga's next reply is leased only if no row of the saga is
                        # left (docs/relay.md, "Direct publishing"). Held back, they
                        # ride with the batch's next round trip.
                        for sql, params in self.writer.direct.sweep():
                            tail.defer(sql, params)
                        reserved = reserve(session, envelopes, tail) if late is None else {}
                        try:
                            for index, envelope in enumerate(envelopes):
                                inbox = PostgresInbox(
                                    session,
                                    self.writer,
                                    optimistic=index not in savepoints,
                                    tail=tail,
                                    reserved=reserved,
                                    late=late,
                                )
                                with bound_contextvars(**(contexts[index] if contexts else {})):
                                    self.participant.handle(session, envelope, inbox=inbox)
                        except SavepointNeeded:
                            rollback_keeping_prepared(session)
                            raise
                        if late:
                            claim_late(tail, late)
                        self.failpoints("participant.before_commit")
                        tail.commit(session)
                    committed()
                self.writer.direct.committed()
                self.writer.direct.swept()
                return
            except SavepointNeeded:
                self.writer.rolled_back()
                savepoints.update(range(index, len(envelopes)))
            except DBAPIError as e:
                self.writer.rolled_back()
                if late is None:
                    raise
                log.info(
                    "inbox_claims_redone",
                    size=len(envelopes),
                    conflict=claim_conflict(e),
                    error=redact_text(str(e.orig)),
                )
                late = None
            except BaseException:
                self.writer.rolled_back()
                raise

    def _local_slip(self, envelopes: Sequence[Envelope]) -> bool:
        name = self.participant.name
        return any(
            e.slip is not None and any(s.participant == name for s in e.slip.next)
            for e in envelopes
        )

    def reply_failure(self, envelope: Envelope, reason: str) -> None:
        """Best effort: tell the orchestrator that ``envelope`` was dead-lettered.

        Not stored in the inbox: nothing was applied, so a later attempt may still run.
        """
        if envelope.kind == "reply" or envelope.reply_to is None:
            return
        try:
            reply = reply_to(envelope, technical_failure(envelope, reason))
            with Session(self.engine) as session, session.begin():
                PostgresInbox(session, self.writer).send(reply, envelope.reply_to)
        except Exception:
            self.writer.rolled_back()
            log.exception("error_reply_failed")
        else:
            self.writer.direct.committed()
            log.info("error_reply_written", reply_id=reply.message_id, reply_type=reply.type)


def bind(
    participant: Participant,
    broker: Broker,
    engine: Engine,
    *,
    retries: RetryPolicy | None = None,
    failpoints: Failpoints = NO_FAILPOINTS,
) -> Binding:
    """Declare one actor per command and compensation of ``participant`` on ``broker``."""
    participant.validate()
    binding = Binding(participant, broker, engine, failpoints=failpoints)
    options = (retries or RetryPolicy()).actor_options()
    for name in participant.handlers:
        binding.actors[name] = Actor(
            binding.process,
            broker=broker,
            actor_name=name,
            queue_name=participant.name,
            priority=0,
            options=dict(options),
        )
    _middleware(broker).add(binding)
    return binding


def _middleware(broker: Broker) -> ParticipantMiddleware:
    for middleware in broker.middleware:
        if isinstance(middleware, ParticipantMiddleware):
            return middleware
    middleware = ParticipantMiddleware()
    # Before Retries: after-hooks run in reverse order, so Retries' after_process_message
    # (which logs the retry or the dead-lettering) runs before ours clears the log context.
    has_retries = any(isinstance(m, Retries) for m in broker.middleware)
    broker.add_middleware(middleware, before=Retries if has_retries else None)
    return middleware


class InboxPurge(Middleware):
    """Purges inbox rows older than ``retention`` every ``interval`` seconds, in a thread
    started when the dramatiq worker boots (also under the ``dramatiq`` CLI)."""

    def __init__(
        self,
        engine: Engine,
        *,
        retention: timedelta = DEFAULT_RETENTION,
        interval: float = 300.0,
        batch_size: int = 1000,
    ) -> None:
        self.engine = engine
        self.retention = retention
        self.interval = interval
        self.batch_size = batch_size
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="inbox-purge", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def purge_once(self) -> int:
        try:
            deleted = purge_inbox(self.engine, self.retention, batch_size=self.batch_size)
        except Exception:
            log.exception("inbox_purge_failed")
            return 0
        if deleted:
            log.info("inbox_purged", deleted=deleted, retention=self.retention.total_seconds())
        return deleted

    def _loop(self) -> None:
        while True:
            self.purge_once()
            if self._stop.wait(self.interval):
                return


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What one worker process needs (built from ParticipantSettings by the entry point)."""

    database_url: str
    amqp_url: str
    # "batch": participants.batching.BatchWorker; "threads": dramatiq's Worker.
    worker: str = "batch"
    batch_size: int = 32
    threads: int = 8
    retention: timedelta = DEFAULT_RETENTION
    purge_interval: float = 300.0
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    # Must match the relay's SAGABOX_QUORUM_QUEUES / SAGABOX_QUORUM_DELIVERY_LIMIT.
    quorum_queues: bool = False
    quorum_delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    failpoints: Failpoints = NO_FAILPOINTS
    # "relay": a relay publishes every row; "direct": the batch worker publishes its
    # replies after the commit, leased for ``publish_lease`` seconds (docs/relay.md).
    # None: the worker's own default, default_publisher(worker).
    publish: str | None = None
    publish_lease: float = 10.0


def default_publisher(worker: str) -> str:
    """Direct where the worker can publish (batch), else the relay (dramatiq's threads)."""
    return "direct" if worker == "batch" else "relay"


def load(module_name: str) -> list[Participant]:
    """The participants a module declares at its top level."""
    module = importlib.import_module(module_name)
    found = [value for value in vars(module).values() if isinstance(value, Participant)]
    if not found:
        raise DefinitionError(f"module {module_name!r} declares no Participant")
    return found


def build(
    participants: Sequence[Participant], config: WorkerConfig
) -> tuple[ParticipantBroker, Engine]:
    """A broker with every participant bound and the inbox purge attached, and its engine."""
    engine = create_engine(
        config.database_url,
        pool_size=config.threads + 1,
        max_overflow=config.threads,
    )
    # Not SQLAlchemy's pre-ping, a round trip per message: a look at the socket.
    check_on_checkout(engine)
    topology = (
        Topology(quorum=True, delivery_limit=config.quorum_delivery_limit)
        if config.quorum_queues
        else None
    )
    broker = ParticipantBroker(url=config.amqp_url, topology=topology)
    for participant in participants:
        bind(participant, broker, engine, retries=config.retries, failpoints=config.failpoints)
    broker.add_middleware(
        InboxPurge(engine, retention=config.retention, interval=config.purge_interval)
    )
    return broker, engine


def run(participants: Sequence[Participant], config: WorkerConfig, stop: threading.Event) -> None:
    """Consume the participants' queues until ``stop`` is set, then shut down cleanly."""
    if config.worker not in WORKERS:
        raise ValueError(f"worker must be one of {WORKERS}, got {config.worker!r}")
    publish = config.publish or default_publisher(config.worker)
    if publish not in PUBLISHERS:
        raise ValueError(f"publish must be one of {PUBLISHERS}, got {publish!r}")
    if publish == "direct" and config.worker != "batch":
        raise ValueError("direct publishing needs the batch worker (SAGABOX_PARTICIPANT_WORKER)")
    broker, engine = build(participants, config)
    worker: Worker | BatchWorker
    if config.worker == "batch":
        lease = config.publish_lease if publish == "direct" else None
        worker = BatchWorker(broker, batch_size=config.batch_size, direct_lease=lease)
    else:
        worker = Worker(broker, worker_threads=config.threads)
    worker.start()
    queues = sorted(p.name for p in participants)
    log.info(
        "participant_worker_started",
        queues=queues,
        worker=config.worker,
        threads=config.threads if config.worker == "threads" else 1,
        batch_size=config.batch_size if config.worker == "batch" else 1,
    )
    try:
        stop.wait()
    finally:
        worker.stop()
        broker.close()
        engine.dispose()
        log.info("participant_worker_stopped", queues=queues)
