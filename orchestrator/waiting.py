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

One waiter serves any number of threads; it holds two connections (the LISTEN and one
for status reads).
"""

from __future__ import annotations

import threading
import time
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


class SagaWaiter:
    """Wakes callers of ``wait`` when their saga settles (see the module's docstring)."""

    def __init__(self, database_url: str, *, reconnect_delay: float = 1.0) -> None:
        # A SQLAlchemy URL (postgresql+psycopg://) or a libpq one.
        self.url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.reconnect_delay = reconnect_delay
        # Status reads so far (each one autocommit transaction), for tests and metrics.
        self.reads = 0
        self._waits: dict[str, list[_Wait]] = {}
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._closed = threading.Event()
        self._listen_pid = 0
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

    def wait(self, saga_id: str, timeout: float) -> str:
        """The status the saga settled in: 'completed', 'compensated' or 'failed'.

        Raises UnknownSagaError if no saga has this id, WaitTimeoutError if it has not
        settled within ``timeout`` seconds (it goes on all the same).
        """
        if self._closed.is_set():
            raise StoreError("this SagaWaiter is closed")
        deadline = time.monotonic() + timeout
        if not self._listening.wait(timeout):
            raise WaitTimeoutError(f"not listening for settled sagas within {timeout} s")
        wait = _Wait()
        with self._lock:
            self._waits.setdefault(saga_id, []).append(wait)
        try:
            statuses = self._statuses([saga_id])
            if saga_id not in statuses:
                raise UnknownSagaError(f"no saga with id {saga_id!r}")
            if statuses[saga_id] in SETTLED:
                return statuses[saga_id]
            if not wait.event.wait(max(0.0, deadline - time.monotonic())):
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

    def _settle(self, saga_id: str, status: str) -> None:
        with self._lock:
            waits = self._waits.get(saga_id, [])
            for wait in waits:
                wait.status = status
                wait.event.set()

    def _listen(self) -> None:
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {SETTLED_CHANNEL}")
                    self._listen_pid = conn.info.backend_pid
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
