"""Waiting for a saga to settle, without polling: ``SagaWaiter``.

The orchestrator sends a NOTIFY on ``sagabox_saga_settled`` in the very transaction that
moves a saga to completed, compensated or failed (payload: ``id:status`` pairs,
orchestrator.store.transitions). A waiter LISTENs on one connection, in a thread of its
own, and wakes the callers waiting for those sagas. A caller first reads the saga's
status, so a saga that settled before the wait began is seen at once; after a lost
connection the waiter reads the status of every saga still waited for, since a
notification sent meanwhile is gone.

    waiter = SagaWaiter(database_url)
    saga_id = orchestrator.start("place_order", data)
    status = waiter.wait(saga_id, timeout=30)   # 'completed', 'compensated' or 'failed'
    waiter.close()

A caller that starts the saga itself can spare that first read (a round trip and a
transaction on the orchestrator's database per saga) with a mark taken before the
start: the waiter was listening then, so the saga's NOTIFY cannot come before it was
listening, and the waiter remembers what it heard for ``mark_window`` seconds after a
mark, in case the saga settles before ``wait`` is called.

    mark = waiter.mark()
    saga_id = orchestrator.start("place_order", data)
    status = waiter.wait(saga_id, timeout=30, since=mark)

One waiter serves any number of threads; it holds two connections (the LISTEN and one
for status reads).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
import structlog

from orchestrator.errors import StoreError, UnknownSagaError, WaitTimeoutError
from orchestrator.state import SETTLED
from orchestrator.store import LISTEN_CHECK, SAGA_STATUSES, SETTLED_CHANNEL

log = structlog.get_logger(__name__)

# Seconds between the listening connection's statements (orchestrator.store.LISTEN_CHECK).
LISTEN_CHECK_INTERVAL = 1.0


@dataclass
class _Wait:
    event: threading.Event = field(default_factory=threading.Event)
    status: str = ""


@dataclass(frozen=True, slots=True)
class WaitMark:
    """What ``SagaWaiter.mark`` returns: which listening session heard the saga, and when."""

    waiter: SagaWaiter
    session: int  # the waiter's listening session then; 0: it was not listening
    at: float  # time.monotonic()


class SagaWaiter:
    """Wakes callers of ``wait`` when their saga settles (see the module's docstring)."""

    def __init__(
        self, database_url: str, *, reconnect_delay: float = 1.0, mark_window: float = 10.0
    ) -> None:
        # A SQLAlchemy URL (postgresql+psycopg://) or a libpq one.
        self.url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.reconnect_delay = reconnect_delay
        self.mark_window = mark_window
        # Status reads so far (each one autocommit transaction), for tests and metrics.
        self.reads = 0
        self._waits: dict[str, list[_Wait]] = {}
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._closed = threading.Event()
        self._listen_pid = 0
        # Counts listening sessions: a mark taken in one is no good in the next, which
        # may have missed notifications. Changes under _lock only.
        self._session = 0
        # What was heard lately, while marks were being taken (see mark()).
        self._heard: dict[str, tuple[str, float]] = {}  # saga id: (status, when)
        self._heard_order: deque[tuple[float, str]] = deque()
        self._last_mark = float("-inf")
        try:
            self._reader = psycopg.connect(self.url, autocommit=True)
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to wait for sagas: {e}") from e
        self._reader_lock = threading.Lock()
        self._thread = threading.Thread(target=self._listen, name="saga-waiter", daemon=True)
        self._thread.start()

    @property
    def backend_pids(self) -> list[int]:
        """The PostgreSQL backends of this waiter's connections (status reads first)."""
        pids = [self._reader.info.backend_pid]
        if self._listen_pid:
            pids.append(self._listen_pid)
        return pids

    def mark(self, timeout: float = 1.0) -> WaitMark:
        """Take before starting a saga, and pass to ``wait(..., since=mark)``.

        A saga started after the mark settles after it, and the waiter hears of it as
        long as its listening session lasts; so ``wait`` needs no status read while
        that session lasts and ``mark_window`` seconds have not passed since the mark.
        Otherwise ``wait`` reads, as without a mark. A waiter not listening yet (just
        built, or reconnecting) is given up to ``timeout`` seconds to listen.
        """
        self._listening.wait(timeout)
        with self._lock:
            now = time.monotonic()
            self._last_mark = now
            return WaitMark(self, self._session if self._listening.is_set() else 0, now)

    def wait(self, saga_id: str, timeout: float, *, since: WaitMark | None = None) -> str:
        """The status the saga settled in: 'completed', 'compensated' or 'failed'.

        ``since``: a ``mark()`` taken before the saga was started (see ``mark``).
        Raises UnknownSagaError if no saga has this id, WaitTimeoutError if it has not
        settled within ``timeout`` seconds (it goes on all the same).
        """
        if self._closed.is_set():
            raise StoreError("this SagaWaiter is closed")
        if since is not None:
            if since.waiter is not self:
                raise ValueError("since= takes a mark of this SagaWaiter, not another's")
            try:
                uuid.UUID(saga_id)
            except (ValueError, TypeError, AttributeError):
                raise UnknownSagaError(f"not a saga id: {saga_id!r}") from None
        deadline = time.monotonic() + timeout
        if not self._listening.wait(timeout):
            raise WaitTimeoutError(f"not listening for settled sagas within {timeout} s")
        wait = _Wait()
        with self._lock:
            self._waits.setdefault(saga_id, []).append(wait)
            # Under the lock with the registration: should the session end after it,
            # the next one reads this saga's status again (_catch_up).
            trusted = self._marked(since)
            heard = self._heard[saga_id][0] if trusted and saga_id in self._heard else None
        try:
            settled = heard if trusted else self._settled(saga_id)
            if settled is not None:
                return settled
            if not wait.event.wait(max(0.0, deadline - time.monotonic())):
                # Not read before: an id that is no saga is told apart from a slow one.
                if trusted and (settled := self._settled(saga_id)) is not None:
                    return settled
                raise WaitTimeoutError(f"saga {saga_id} did not settle within {timeout} s")
            return wait.status
        finally:
            with self._lock:
                waits = self._waits.get(saga_id, [])
                if wait in waits:
                    waits.remove(wait)
                if not waits:
                    self._waits.pop(saga_id, None)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        with self._reader_lock:
            self._reader.close()

    def __enter__(self) -> SagaWaiter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _settled(self, saga_id: str) -> str | None:
        """The status the saga settled in, None if it has not (UnknownSagaError if no
        saga has this id): one read."""
        statuses = self._statuses([saga_id])
        if saga_id not in statuses:
            raise UnknownSagaError(f"no saga with id {saga_id!r}")
        return statuses[saga_id] if statuses[saga_id] in SETTLED else None

    def _statuses(self, saga_ids: Sequence[str]) -> dict[str, str]:
        with self._reader_lock:
            self.reads += 1
            try:
                rows = self._reader.execute(SAGA_STATUSES, [list(saga_ids)]).fetchall()
            except psycopg.DataError as e:
                raise UnknownSagaError(f"not a saga id: {e}") from e
            except psycopg.Error as e:
                if self._reader.closed:
                    self._reader = psycopg.connect(self.url, autocommit=True)
                raise StoreError(f"cannot read saga statuses: {e}") from e
        return {str(saga_id): str(status) for saga_id, status in rows}

    def _marked(self, since: WaitMark | None) -> bool:
        """Whether everything settled since ``since`` was heard or is still to come
        (call under _lock)."""
        return (
            since is not None
            and since.session != 0
            and since.session == self._session
            and self._listening.is_set()
            and time.monotonic() - since.at < self.mark_window
        )

    def _settle(self, saga_id: str, status: str) -> None:
        with self._lock:
            waits = self._waits.get(saga_id, [])
            for wait in waits:
                wait.status = status
                wait.event.set()
            now = time.monotonic()
            if now - self._last_mark < self.mark_window:
                # Kept until no mark that could still ask for it is within its window.
                self._heard[saga_id] = (status, now)
                self._heard_order.append((now, saga_id))
            while self._heard_order and now - self._heard_order[0][0] >= self.mark_window:
                at, old = self._heard_order.popleft()
                if old in self._heard and self._heard[old][1] == at:  # not heard since
                    del self._heard[old]

    def _listen(self) -> None:
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {SETTLED_CHANNEL}")
                    self._listen_pid = conn.info.backend_pid
                    with self._lock:
                        self._session += 1
                        self._listening.set()
                    self._catch_up()
                    checked = time.monotonic()
                    while not self._closed.is_set():
                        for notify in conn.notifies(timeout=0.5):
                            for pair in notify.payload.split(","):
                                saga_id, _, status = pair.partition(":")
                                self._settle(saga_id, status)
                        if time.monotonic() - checked >= LISTEN_CHECK_INTERVAL:
                            conn.execute(LISTEN_CHECK)
                            checked = time.monotonic()
            except (psycopg.Error, StoreError) as e:
                with self._lock:
                    self._listening.clear()
                log.warning("saga_waiter_reconnecting", error=repr(e))
                self._closed.wait(self.reconnect_delay)

    def _catch_up(self) -> None:
        """Read the status of every saga waited for: notifications may have been missed."""
        with self._lock:
            waited = list(self._waits)
        if not waited:
            return
        for saga_id, status in self._statuses(waited).items():
            if status in SETTLED:
                self._settle(saga_id, status)
