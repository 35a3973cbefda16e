"""The orchestrator: the pure machine wrapped in one PostgreSQL transaction per batch.

Applying replies reads as the five steps of the pattern:
lock the sagas, dedup the replies in the inbox, decide, save state and history,
add the commands to the outbox; then commit. Only after the commit does the
caller acknowledge the messages, so a crash anywhere redoes the whole batch and
the inbox makes the redo a no-op.

Operator actions (retry_step, skip_step, abort, resume) are events of the machine
too, each applied in its own transaction with the actor kept in the history.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import structlog
from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from orchestrator import spans, store
from orchestrator.errors import (
    IdempotencyConflictError,
    InvalidInputError,
    OperatorActionError,
    StoreError,
    UnknownSagaError,
)
from orchestrator.events import (
    Event,
    OperatorEvent,
    SagaAborted,
    SagaResumed,
    Started,
    StepRetried,
    StepSkipped,
    TimersDue,
    event_from_dict,
    event_from_reply,
)
from orchestrator.machine import Command, Transition, start, transition
from orchestrator.registry import Registry
from orchestrator.state import SagaState
from orchestrator.validation import check_input
from outbox_relay import roundtrips, tracing
from outbox_relay.message import DEFAULT_REPLY_QUEUE, Envelope, encode, is_valid_traceparent
from outbox_relay.roundtrips import Tail
from outbox_relay.table import OutboxWriter, OutgoingMessage, leased_statement

if TYPE_CHECKING:  # orchestrator.starts imports orchestrator.metrics, which imports us
    from orchestrator.starts import StartPublisher

log = structlog.get_logger("sagabox.orchestrator")

# The key of SagaState.extra (and of the Started history entry's "extra") holding the
# caller's W3C trace context, which every message of the saga then carries.
TRACEPARENT = "traceparent"

OutcomeStatus = Literal["applied", "ignored", "duplicate", "rejected"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one reply: applied, ignored (late/stale), duplicate, or rejected.

    A rejected reply does not fit this database (unknown saga, definition not
    registered here, not a reply): the caller dead-letters it with ``note``.
    """

    message_id: str
    saga_id: str
    status: OutcomeStatus
    note: str = ""


@dataclass(frozen=True, slots=True)
class SagaView:
    """One saga as an operator sees it."""

    row: store.SagaRow
    history: list[dict[str, Any]]

    @property
    def state(self) -> SagaState:
        return SagaState.from_dict(self.row.state)


class Orchestrator:
    """Starts sagas and applies replies and timers, each in one local transaction."""

    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        *,
        reply_queue: str = DEFAULT_REPLY_QUEUE,
        clock: Callable[[], float] = time.time,
        outbox: OutboxWriter | None = None,
        notify_settled: bool = True,
        starts: StartPublisher | None = None,
    ) -> None:
        if starts is not None and starts.engine is not engine:
            raise ValueError("the StartPublisher must use the orchestrator's engine")
        self.engine = engine
        # Its transactions' BEGIN rides with their first statement (_transaction_with_tail).
        roundtrips.hold(engine)
        self.registry = registry
        self.reply_queue = reply_queue
        self.clock = clock
        self.outbox = outbox or OutboxWriter()
        # Wakes SagaWaiters (orchestrator.waiting); each NOTIFY serialises a commit, so
        # a deployment where no caller waits may turn it off.
        self.notify_settled = notify_settled
        # Publishes the first commands of the starts that commit on their own, from this
        # process (orchestrator.starts); None: the relay publishes them.
        self.starts = starts

    # -- starting ----------------------------------------------------------------

    def start(
        self,
        name: str,
        data: Mapping[str, Any],
        *,
        version: int | None = None,
        idempotency_key: str | None = None,
        connection: Connection | Session | None = None,
        traceparent: str | None = None,
    ) -> str:
        """Start a saga and return its id.

        With ``connection`` (a SQLAlchemy Connection or Session), everything is written
        in the caller's transaction, which the caller commits: an order row and its
        saga appear together or not at all. Without it, the saga commits on its own.
        Starting twice with one ``idempotency_key`` returns the first saga's id. With a
        ``StartPublisher`` (``starts``) and no ``connection``, its thread publishes the
        saga's first commands; otherwise the relay does.
        ``traceparent`` (W3C trace context) is kept with the saga and sent with each
        of its messages, so the caller's trace follows the saga everywhere.
        """
        definition = self.registry.get(name, version)
        payload = check_input(definition, data)
        try:
            json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"saga {name!r}: data is not JSON: {e}") from e
        if idempotency_key is not None and not (
            isinstance(idempotency_key, str) and 0 < len(idempotency_key) <= 200
        ):
            raise InvalidInputError("idempotency_key must be a string of 1 to 200 characters")
        if traceparent is not None and not is_valid_traceparent(traceparent):
            raise InvalidInputError(
                f"traceparent must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>), "
                f"got {traceparent!r:.80}"
            )
        args = (definition.name, definition.version, payload, idempotency_key)
        with tracing.span(
            f"saga start {definition.name}",
            traceparent,
            kind="producer",
            attributes={"sagabox.saga": definition.name, "sagabox.version": definition.version},
        ):
            if connection is None:
                # One statement, atomic on its own: no BEGIN, one round trip.
                starts = self.starts if self.starts is not None and self.starts.ready else None
                with _autocommit(self.engine, self.outbox) as conn:
                    return self._start(conn, *args, traceparent=traceparent, starts=starts)
            with _translated():
                conn = connection.connection() if isinstance(connection, Session) else connection
                # Committed by the caller, when we cannot tell: the relay's.
                return self._start(conn, *args, traceparent=traceparent, starts=None)

    def _start(
        self,
        conn: Connection,
        name: str,
        version: int,
        data: dict[str, Any],
        idempotency_key: str | None,
        *,
        traceparent: str | None,
        starts: StartPublisher | None,
    ) -> str:
        """``starts``: the statement commits on its own, and its leased rows go to it."""
        definition = self.registry.get(name, version)
        saga_id = str(uuid.uuid4())
        now = self.clock()
        t = start(definition, saga_id, data, now)
        extra = {TRACEPARENT: traceparent} if traceparent is not None else {}
        t = replace(t, state=_with_extra(t.state, extra))
        started = _history_row(t, Started(data=data), None, 1, now)
        if extra:
            # Kept in the history too, so that replay rebuilds the same state.
            started["event_data"] = {**started["event_data"], "extra": extra}
        messages = [
            self._outgoing(definition.name, version, c, None, now, traceparent=traceparent)
            for c in t.commands
        ]
        new = store.NewSaga(
            saga_id,
            name,
            version,
            t.state.status.value,
            t.state.to_dict(),
            t.state.wake_at,
            idempotency_key,
            started,
        )
        along = store.new_saga(new)
        publisher = starts if messages else None
        built: tuple[str, dict[str, Any]] | None
        if publisher is not None:
            built = leased_statement(messages, along=along, lease=publisher.lease)
        else:
            # For the relay: the caller's thread is not the reply consumer's, which
            # publishes the rows its writer leased (a start is called from anywhere).
            built = self.outbox.statement(messages, along=along, lease=False)
        assert built is not None  # the saga row is always in it
        if idempotency_key is None and publisher is None:
            conn.exec_driver_sql(*built)
            self._log_started(saga_id, name, version, t)
            return saga_id
        # One row: the leased rows' ids and message ids (leased), then whether the key
        # was new (with a key).
        row = conn.exec_driver_sql(*built).one()
        if publisher is not None:
            took = row[:-1] if idempotency_key is not None else row
            if took[-2]:
                sent = {m.message_id: m for m in messages}
                publisher.submit(
                    [(i, sent[mid]) for i, mid in zip(took[-2], took[-1], strict=True)]
                )
        if idempotency_key is None:
            self._log_started(saga_id, name, version, t)
            return saga_id
        if not row[-1]:
            existing = store.find_by_key(conn, name, idempotency_key)
            if existing is None:  # pragma: no cover - the conflicting row was deleted meanwhile
                raise StoreError("idempotency key conflict but no saga found; retry")
            if existing.state.get("data") != data:
                raise IdempotencyConflictError(
                    f"idempotency key {idempotency_key!r} already started saga {existing.id} "
                    "with different data"
                )
            return existing.id
        self._log_started(saga_id, name, version, t)
        return saga_id

    @staticmethod
    def _log_started(saga_id: str, name: str, version: int, t: Transition) -> None:
        # The context as the line's own fields: binding contextvars for one line costs
        # more than the line does when its level is filtered out.
        log.info(
            "saga_started",
            correlation_id=saga_id,
            saga=name,
            version=version,
            status=t.state.status.value,
            commands=len(t.commands),
        )

    # -- replies -----------------------------------------------------------------

    def handle_replies(self, replies: Sequence[Envelope]) -> list[Outcome]:
        """Apply a batch of reply envelopes in ONE transaction; return one outcome each."""
        if not replies:
            return []
        now = self.clock()
        outcomes: dict[str, Outcome] = {}
        with self._writing(direct=True) as (conn, tail):
            # The inbox takes only the replies with no problem: those whose saga is
            # missing or another one are left out by the statement itself.
            rows, fresh = store.lock_and_record(
                conn,
                (r.correlation_id for r in replies),
                (
                    store.ReplyKey(r.message_id, r.correlation_id, r.saga, r.version)
                    for r in replies
                    if r.kind == "reply" and (r.saga, r.version) in self.registry
                ),
                tail,
            )
            acceptable: list[Envelope] = []
            for reply in replies:
                problem = self._reply_problem(reply, rows.get(reply.correlation_id))
                if problem:
                    outcomes[reply.message_id] = Outcome(
                        reply.message_id, reply.correlation_id, "rejected", problem
                    )
                else:
                    acceptable.append(reply)
            states: dict[str, tuple[store.SagaRow, SagaState, int]] = {}
            history_rows: list[dict[str, Any]] = []
            messages: list[OutgoingMessage] = []
            for reply in acceptable:
                if reply.message_id not in fresh or reply.message_id in outcomes:
                    outcomes.setdefault(
                        reply.message_id,
                        Outcome(reply.message_id, reply.correlation_id, "duplicate", "seen before"),
                    )
                    continue
                row = rows[reply.correlation_id]
                _, state, revision = states.get(
                    row.id, (row, SagaState.from_dict(row.state), row.revision)
                )
                definition = self.registry.get(row.name, row.version)
                event = event_from_reply(reply)
                with tracing.span(
                    f"saga reply {row.name}.{reply.step} {reply.type}",
                    _traceparent(state) or reply.traceparent,
                    kind="consumer",
                    attributes=_span_attributes(row, reply),
                ):
                    t = transition(definition, state, event, now)
                    outcome = self._log(t, event, reply, row)
                outcomes[reply.message_id] = outcome
                if not t.changed:
                    continue
                if tracing.enabled():
                    spans.record_attempt(
                        definition,
                        state,
                        t.state,
                        reply,
                        traceparent=_traceparent(state) or reply.traceparent,
                        now=self.clock(),
                    )
                revision += 1
                states[row.id] = (row, t.state, revision)
                history_rows.append(_history_row(t, event, state, revision, now))
                messages.extend(
                    self._outgoing(
                        row.name,
                        row.version,
                        c,
                        reply.message_id,
                        now,
                        traceparent=_traceparent(t.state),
                    )
                    for c in t.commands
                )
            self._save(conn, tail, states, history_rows, messages, direct=True)
        return [outcomes[r.message_id] for r in replies]

    def _reply_problem(self, reply: Envelope, row: store.SagaRow | None) -> str:
        if reply.kind != "reply":
            return f"not a reply: kind {reply.kind!r}"
        if row is None:
            return f"no saga {reply.correlation_id} in this database"
        if (reply.saga, reply.version) != (row.name, row.version):
            return (
                f"reply names saga {reply.saga} v{reply.version} but saga "
                f"{row.id} is {row.name} v{row.version}"
            )
        try:
            self.registry.get(row.name, row.version)
        except UnknownSagaError as e:
            return f"definition not registered in this orchestrator: {e}"
        return ""

    # -- timers ------------------------------------------------------------------

    def purge_replies(self, older_than_seconds: float, limit: int = 10_000) -> int:
        """Forget reply ids received more than ``older_than_seconds`` ago (up to ``limit``).

        Safe at any age: the inbox only spares the machine work, since the machine
        itself ignores a reply to an attempt it has already decided.
        """
        cutoff = store.timestamp(self.clock() - older_than_seconds)
        assert cutoff is not None
        with self._begin() as conn:
            return store.purge_reply_inbox(conn, cutoff, limit)

    def purge_finished(self, older_than_seconds: float, limit: int = 1_000) -> int:
        """Delete completed and compensated sagas that ended more than
        ``older_than_seconds`` ago, with their history (up to ``limit``; how many).

        Failed sagas are kept: they wait for an operator. A start that reuses the
        idempotency key of a purged saga starts a new saga.
        """
        cutoff = store.timestamp(self.clock() - older_than_seconds)
        assert cutoff is not None
        with self._begin() as conn:
            return store.purge_finished_sagas(conn, cutoff, limit)

    def fire_timers(self, limit: int = 200) -> int:
        """Apply every due deadline and scheduled retry (up to ``limit`` sagas).

        Safe with several orchestrators: due sagas are claimed with SKIP LOCKED.
        Returns the number of sagas handled.
        """
        now = self.clock()
        with self._writing(direct=True) as (conn, tail):
            rows = store.lock_due_sagas(conn, now, limit, tail)
            states: dict[str, tuple[store.SagaRow, SagaState, int]] = {}
            history_rows: list[dict[str, Any]] = []
            messages: list[OutgoingMessage] = []
            for row in rows:
                state = SagaState.from_dict(row.state)
                try:
                    definition = self.registry.get(row.name, row.version)
                except UnknownSagaError:
                    log.error(
                        "saga_definition_missing",
                        correlation_id=row.id,
                        saga=row.name,
                        version=row.version,
                    )
                    continue
                event = TimersDue()
                t = transition(definition, state, event, now)
                revision = row.revision + (1 if t.changed else 0)
                # Even an ignored tick rewrites wake_at, so the row is not picked again.
                states[row.id] = (row, t.state, revision)
                if t.changed:
                    history_rows.append(_history_row(t, event, state, revision, now))
                    messages.extend(
                        self._outgoing(
                            row.name, row.version, c, None, now, traceparent=_traceparent(t.state)
                        )
                        for c in t.commands
                    )
                    with structlog.contextvars.bound_contextvars(
                        correlation_id=row.id, saga=row.name
                    ):
                        log.info("saga_timers_fired", status=t.state.status.value, note=t.note)
            self._save(conn, tail, states, history_rows, messages, direct=True)
        return len(rows)

    # -- operator actions --------------------------------------------------------

    def retry_step(self, saga_id: str, step: str, *, actor: str, reason: str) -> SagaState:
        """A new attempt of the parked step (or of its compensation); returns the new state."""
        return self._operate(saga_id, StepRetried(step, actor=actor, reason=reason))

    def skip_step(
        self,
        saga_id: str,
        step: str,
        *,
        actor: str,
        reason: str,
        result: Mapping[str, Any] | None = None,
    ) -> SagaState:
        """Count a step as done by hand (succeeded with ``result``, or compensated)."""
        if result is not None:
            if not isinstance(result, Mapping):
                raise OperatorActionError(f"the result for {step} must be a JSON object")
            try:
                json.dumps(result, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise OperatorActionError(f"the result for {step} is not JSON: {e}") from e
            result = dict(result)
        return self._operate(saga_id, StepSkipped(step, result, actor=actor, reason=reason))

    def abort(self, saga_id: str, *, actor: str, reason: str) -> SagaState:
        """Start backward recovery of a saga whose pivot has not passed."""
        return self._operate(saga_id, SagaAborted(actor=actor, reason=reason))

    def resume(self, saga_id: str, *, actor: str, reason: str) -> SagaState:
        """A parked saga goes on where it stopped."""
        return self._operate(saga_id, SagaResumed(actor=actor, reason=reason))

    def _operate(self, saga_id: str, event: OperatorEvent) -> SagaState:
        """One operator action in one transaction; refused actions change nothing."""
        _check_saga_id(saga_id)
        now = self.clock()
        with self._writing() as (conn, tail):
            row = store.lock_sagas(conn, [saga_id], tail).get(saga_id)
            if row is None:
                raise UnknownSagaError(f"no saga with id {saga_id}")
            definition = self.registry.get(row.name, row.version)
            state = SagaState.from_dict(row.state)
            t = transition(definition, state, event, now)
            with structlog.contextvars.bound_contextvars(
                correlation_id=row.id, saga=row.name, version=row.version, actor=event.actor
            ):
                if not t.changed:
                    log.warning("operator_action_refused", action=event.type, note=t.note)
                    raise OperatorActionError(
                        f"cannot {_VERBS[event.type]} saga {saga_id}: "
                        + t.note.removeprefix("refused: ")
                    )
                revision = row.revision + 1
                messages = [
                    self._outgoing(
                        row.name, row.version, c, None, now, traceparent=_traceparent(t.state)
                    )
                    for c in t.commands
                ]
                self._save(
                    conn,
                    tail,
                    {row.id: (row, t.state, revision)},
                    [_history_row(t, event, state, revision, now)],
                    messages,
                )
                log.info(
                    "operator_action_applied",
                    action=event.type,
                    status=t.state.status.value,
                    note=t.note,
                )
        return t.state

    # -- reading -----------------------------------------------------------------

    def get(self, saga_id: str) -> SagaView:
        _check_saga_id(saga_id)
        with self._begin() as conn:
            row = store.get_saga(conn, saga_id)
            if row is None:
                raise UnknownSagaError(f"no saga with id {saga_id}")
            return SagaView(row, store.load_history(conn, saga_id))

    def replay(self, saga_id: str) -> SagaState:
        """Rebuild a saga's state from its history alone (an audit of the record)."""
        view = self.get(saga_id)
        definition = self.registry.get(view.row.name, view.row.version)
        state: SagaState | None = None
        for entry in view.history:
            event = event_from_dict(entry["event_data"])
            now = entry["at"].timestamp()
            if isinstance(event, Started):
                state = start(definition, saga_id, event.data, now).state
                state = _with_extra(state, entry["event_data"].get("extra", {}))
            else:
                assert state is not None
                state = transition(definition, state, event, now).state
        assert state is not None
        return state

    # -- helpers -----------------------------------------------------------------

    def _save(
        self,
        conn: Connection,
        tail: Tail,
        states: Mapping[str, tuple[store.SagaRow, SagaState, int]],
        history_rows: Sequence[dict[str, Any]],
        messages: Sequence[OutgoingMessage],
        *,
        direct: bool = False,
    ) -> None:
        """States, history and outbox rows in one round trip. ``direct``: on the reply
        consumer's thread, whose DirectPublisher publishes what a leasing writer leased."""
        along = store.transitions(
            [
                {
                    "id": saga_id,
                    "status": state.status.value,
                    "state": state.to_dict(),
                    "wake_at": state.wake_at,
                    "revision": revision,
                }
                for saga_id, (_, state, revision) in states.items()
            ],
            history_rows,
            notify_settled=self.notify_settled,
        )
        leased = direct and self.outbox.leases(messages, along=along)
        built = self.outbox.statement(messages, along=along, lease=leased)
        roundtrips.run(conn, tail, built, self.outbox.direct.took if leased else None)

    def _outgoing(
        self,
        saga: str,
        version: int,
        command: Command,
        causation_id: str | None,
        now: float,
        *,
        traceparent: str | None,
    ) -> OutgoingMessage:
        envelope = Envelope(
            message_id=command.message_id,
            correlation_id=command.saga_id,
            causation_id=causation_id,
            saga=saga,
            version=version,
            step=command.step,
            attempt=command.attempt,
            kind=command.kind,
            type=command.type,
            payload=command.payload,
            reply_to=self.reply_queue,
            sent_at=now,
            traceparent=traceparent,
            slip=command.slip,
        )
        return OutgoingMessage(
            message_id=command.message_id,
            correlation_id=command.saga_id,
            destination=command.participant,
            body=encode(envelope, queue=command.participant, actor=command.type),
            # The relay publishes these as AMQP headers, where tracing tools look.
            headers={TRACEPARENT: traceparent} if traceparent is not None else None,
        )

    def _log(self, t: Transition, event: Event, reply: Envelope, row: store.SagaRow) -> Outcome:
        context = {
            "correlation_id": row.id,
            "message_id": reply.message_id,
            "causation_id": reply.causation_id,
            "saga": row.name,
            "version": row.version,
            "step": reply.step,
            "attempt": reply.attempt,
        }
        if t.changed:
            log.info(
                "saga_transitioned",
                **context,
                saga_event=event.type,
                status=t.state.status.value,
                note=t.note,
            )
            return Outcome(reply.message_id, row.id, "applied", t.note)
        log.info("reply_ignored", **context, saga_event=event.type, note=t.note)
        return Outcome(reply.message_id, row.id, "ignored", t.note)

    def _begin(self) -> AbstractContextManager[Connection]:
        return _transaction(self.engine, self.outbox)

    def _writing(self, *, direct: bool = False) -> AbstractContextManager[tuple[Connection, Tail]]:
        """A transaction whose last statement (states, history, outbox) is sent with
        its COMMIT, in one round trip (outbox_relay.roundtrips); ``direct``: see _save."""
        return _transaction_with_tail(self.engine, self.outbox, direct=direct)


def _history_row(
    t: Transition, event: Event, before: SagaState | None, seq: int, now: float
) -> dict[str, Any]:
    return {
        "saga_id": t.state.saga_id,
        "seq": seq,
        "at": now,
        "event": event.type,
        "step": getattr(event, "step", None),
        "attempt": getattr(event, "attempt", None),
        "message_id": event.message_id,
        "from_status": before.status.value if before is not None else None,
        "to_status": t.state.status.value,
        "reason": t.note or None,
        "event_data": event.to_dict(),
        "emitted": [c.message_id for c in t.commands] or None,
        "actor": event.actor if isinstance(event, OperatorEvent) else None,
    }


def _with_extra(state: SagaState, extra: Mapping[str, Any]) -> SagaState:
    return replace(state, extra={**state.extra, **extra}) if extra else state


def _traceparent(state: SagaState) -> str | None:
    value = state.extra.get(TRACEPARENT)
    return value if isinstance(value, str) else None


def _span_attributes(row: store.SagaRow, reply: Envelope) -> dict[str, str | int]:
    return {
        "sagabox.saga_id": row.id,
        "sagabox.saga": row.name,
        "sagabox.version": row.version,
        "sagabox.step": reply.step,
        "sagabox.attempt": reply.attempt,
        "sagabox.reply_type": reply.type,
        "messaging.message.id": reply.message_id,
    }


_VERBS = {
    StepRetried.type: "retry a step of",
    StepSkipped.type: "skip a step of",
    SagaAborted.type: "abort",
    SagaResumed.type: "resume",
}


def _check_saga_id(saga_id: str) -> None:
    try:
        uuid.UUID(saga_id)
    except (ValueError, TypeError, AttributeError):
        raise UnknownSagaError(f"{saga_id!r} is not a saga id (a UUID)") from None


@contextmanager
def _translated() -> Iterator[None]:
    """Driver errors surface as StoreError, with the driver's error as the cause."""
    try:
        yield
    except DBAPIError as e:
        raise StoreError(f"saga database error: {e.orig}") from e


@contextmanager
def _transaction(
    engine: Engine, outbox: OutboxWriter, *, direct: bool = False
) -> Iterator[Connection]:
    try:
        with _translated(), engine.begin() as conn:
            yield conn
    except BaseException:
        # Only the reply consumer's transactions (direct) lease: a start or an operator
        # action failing on another thread must not forget what the consumer leased.
        outbox.rolled_back(leasing=direct)
        raise


@contextmanager
def _autocommit(engine: Engine, outbox: OutboxWriter) -> Iterator[Connection]:
    """A connection whose statements each commit on their own: for a write that is one
    statement, whose BEGIN would be a round trip of its own."""
    try:
        with _translated(), engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")
    except BaseException:
        outbox.rolled_back(leasing=False)
        raise


@contextmanager
def _transaction_with_tail(
    engine: Engine, outbox: OutboxWriter, *, direct: bool = False
) -> Iterator[tuple[Connection, Tail]]:
    """A transaction whose BEGIN goes with its first statement, and its last statements
    with its COMMIT (outbox_relay.roundtrips): a round trip each."""
    try:
        with (
            _translated(),
            engine.connect() as conn,
            conn.execution_options(**roundtrips.AUTOCOMMIT).begin(),
            roundtrips.opening(conn) as tail,
        ):
            if direct:
                # Confirmed rows deleted before this transaction's insert, not after it:
                # a saga's next command is leased only if no row of the saga is left,
                # and the confirmed command its reply answers would otherwise still be
                # there.
                for sql, params in outbox.direct.sweep():
                    tail.defer(sql, params)
            yield conn, tail
            tail.commit(conn)
    except BaseException:
        # As _transaction: only the reply consumer's transactions (direct) lease.
        outbox.rolled_back(leasing=direct)
        raise
    if direct:
        outbox.direct.committed()
        outbox.direct.swept()
