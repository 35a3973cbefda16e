"""The orchestrator's Prometheus metrics.

Counters and histograms are fed by the reply consumer (orchestrator.service) from the
``Outcome`` of each reply it applied. The saga gauges are read from the database
(one GROUP BY every few seconds), so they stay right with several orchestrators
sharing a database and across restarts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import structlog
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.definition import Saga
from orchestrator.engine import Outcome

log = structlog.get_logger("sagabox.orchestrator")

REPLIES = Counter(
    "sagabox_orchestrator_replies",
    "Replies taken off the reply queue, by outcome (applied, ignored, duplicate, rejected)",
    ["outcome"],
)
DEAD_LETTERED = Counter(
    "sagabox_orchestrator_replies_dead_lettered",
    "Replies parked in the reply dead-letter queue (undecodable or rejected)",
)
REDELIVERED = Counter(
    "sagabox_orchestrator_replies_redelivered",
    "Replies RabbitMQ delivered again (a consumer died or a connection dropped before the ack)",
)
BATCH_SIZE = Histogram(
    "sagabox_orchestrator_batch_size",
    "Replies applied per transaction",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
BATCH_SECONDS = Histogram(
    "sagabox_orchestrator_batch_seconds",
    "Time to apply one batch of replies (one transaction, commit included)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DIRECT_PUBLISHED = Counter(
    "sagabox_orchestrator_direct_published",
    "Commands the reply consumer published itself (direct publishing), by outcome: "
    "confirmed (then deleted) or refused (nacked or returned, handed to the relay)",
    ["outcome"],
)
STARTS_PUBLISHED = Counter(
    "sagabox_orchestrator_starts_published",
    "First commands of sagas started in this process that its StartPublisher published "
    "(orchestrator.starts), by outcome: confirmed (then deleted) or refused (nacked or "
    "returned, handed to the relay)",
    ["outcome"],
)
TIMERS_FIRED = Counter(
    "sagabox_orchestrator_timers_fired",
    "Sagas whose deadline or scheduled retry fired (timeouts and retries)",
)


def record_outcomes(outcomes: Sequence[Outcome], undecodable: int = 0) -> None:
    """Count what became of each reply of a batch."""
    for outcome in outcomes:
        REPLIES.labels(outcome.status).inc()
    if undecodable:
        REPLIES.labels("rejected").inc(undecodable)


# One row per (saga, version, status); long-running counts running/compensating sagas
# created longer ago than their definition's deadline (else the default threshold).
SAGA_COUNTS = text(
    """
    SELECT s.name, s.version, s.status, count(*) AS total,
           count(*) FILTER (WHERE s.status IN ('running', 'compensating')
                            AND s.created_at < now()
                                - make_interval(secs => coalesce(d.deadline, :threshold)))
             AS long_running
    FROM sagabox.saga s
    LEFT JOIN unnest(CAST(:names AS text[]), CAST(:versions AS int[]),
                     CAST(:deadlines AS float8[])) AS d (name, version, deadline)
           ON d.name = s.name AND d.version = s.version
    GROUP BY s.name, s.version, s.status
    """
)


@dataclass(frozen=True, slots=True)
class SagaCount:
    name: str
    version: int
    status: str
    total: int
    long_running: int


def saga_counts(
    engine: Engine,
    long_running_after: float,
    deadlines: Mapping[tuple[str, int], float] | None = None,
) -> list[SagaCount]:
    """Sagas per (name, version, status) as the database has them now; ``deadlines``:
    (name, version) -> seconds, the definitions' own, in place of ``long_running_after``."""
    keys = list(deadlines or {})
    params = {
        "threshold": long_running_after,
        "names": [name for name, _ in keys],
        "versions": [version for _, version in keys],
        "deadlines": [float((deadlines or {})[key]) for key in keys],
    }
    with engine.connect() as conn:
        rows = conn.execute(SAGA_COUNTS, params).all()
    return [SagaCount(r.name, r.version, r.status, r.total, r.long_running) for r in rows]


def deadlines(definitions: Iterable[Saga]) -> dict[tuple[str, int], float]:
    """(name, version) -> deadline, for the definitions that set one."""
    return {(d.name, d.version): d.deadline for d in definitions if d.deadline is not None}


@dataclass(eq=False)  # hashable: the registry keys collectors by identity
class SagaGauges(Collector):
    """``sagabox_sagas{saga,version,status}`` and ``sagabox_sagas_long_running{saga,version}``,
    from a snapshot refreshed every ``interval`` seconds by a daemon thread."""

    engine: Engine
    interval: float = 5.0
    long_running_after: float = 300.0
    deadlines: Mapping[tuple[str, int], float] = field(default_factory=dict)
    _snapshot: list[SagaCount] = field(default_factory=list, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)

    def refresh(self) -> None:
        try:
            self._snapshot = saga_counts(self.engine, self.long_running_after, self.deadlines)
        except SQLAlchemyError as e:
            log.warning("saga_metrics_failed", error=str(e).splitlines()[0])

    def collect(self) -> Iterator[Metric]:
        sagas = GaugeMetricFamily(
            "sagabox_sagas",
            "Sagas in the database by name, version and status (started = the sum)",
            labels=["saga", "version", "status"],
        )
        long_running = GaugeMetricFamily(
            "sagabox_sagas_long_running",
            "Running or compensating sagas older than their definition's deadline "
            "(default SAGABOX_METRICS_LONG_RUNNING_SECONDS)",
            labels=["saga", "version"],
        )
        late: dict[tuple[str, str], int] = {}
        for count in self._snapshot:
            sagas.add_metric([count.name, str(count.version), count.status], count.total)
            key = (count.name, str(count.version))
            late[key] = late.get(key, 0) + count.long_running
        for (name, version), value in late.items():
            long_running.add_metric([name, version], value)
        yield sagas
        yield long_running

    def start(self, registry: CollectorRegistry = REGISTRY) -> None:
        """Register with ``registry`` and refresh in the background until ``stop()``."""
        self.refresh()
        registry.register(self)
        threading.Thread(target=self._loop, name="saga-metrics", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()
