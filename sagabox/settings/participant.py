"""Settings of a participant worker process (``sagabox participant MODULE``).

SAGABOX_PARTICIPANT_DATABASE_URL     the participant's own database (inbox, outbox, tables)
SAGABOX_AMQP_URL                     RabbitMQ
SAGABOX_PARTICIPANT_PROCESSES        worker processes (default 1)
SAGABOX_PARTICIPANT_WORKER           batch (default): one thread handles the commands
                                     waiting in one transaction; threads: dramatiq's
                                     Worker, a transaction per command on each thread
SAGABOX_PARTICIPANT_BATCH_SIZE       most commands per transaction (batch; default 32)
SAGABOX_PARTICIPANT_THREADS          worker threads per process (threads; default 8)
SAGABOX_PARTICIPANT_PUBLISH          direct (default with the batch worker): the worker
                                     publishes its replies itself after its commit, the
                                     relay as the safety net; relay (default with
                                     threads): a relay publishes the replies
SAGABOX_PARTICIPANT_PUBLISH_LEASE    seconds a relay leaves a directly published row
                                     alone (default 10)
SAGABOX_PARTICIPANT_MAX_RETRIES      dramatiq retries of a technical failure (default 5)
SAGABOX_PARTICIPANT_MIN_BACKOFF_MS   first retry delay (default 1000)
SAGABOX_PARTICIPANT_MAX_BACKOFF_MS   longest retry delay (default 300000)
SAGABOX_INBOX_RETENTION_SECONDS      how long inbox rows are kept (default 7 days)
SAGABOX_INBOX_PURGE_INTERVAL_SECONDS how often they are purged (default 300)
SAGABOX_LOG_LEVEL, SAGABOX_LOG_FILE  logging
SAGABOX_METRICS_PORT                 Prometheus metrics port (default 0: off); with
                                     several processes, process i serves on port + i
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from outbox_relay.topology import DEFAULT_DELIVERY_LIMIT
from participants.worker import (
    PUBLISHERS,
    WORKERS,
    RetryPolicy,
    WorkerConfig,
    default_publisher,
)
from sagabox.settings import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, Env, amqp_url, database_url

DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600
DEFAULT_PUBLISH_LEASE = 10.0


@dataclass(frozen=True, slots=True)
class ParticipantSettings:
    database_url: str
    amqp_url: str
    processes: int = 1
    worker: str = "batch"
    batch_size: int = 32
    threads: int = 8
    publish: str = "direct"
    publish_lease: float = DEFAULT_PUBLISH_LEASE
    max_retries: int = 5
    min_backoff_ms: int = 1000
    max_backoff_ms: int = 300_000
    inbox_retention_seconds: float = DEFAULT_RETENTION_SECONDS
    inbox_purge_interval_seconds: float = 300.0
    quorum_queues: bool = False
    quorum_delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    log_level: str = "INFO"
    log_file: str | None = None
    metrics_port: int = 0

    @classmethod
    def from_env(cls, env: Env | None = None) -> ParticipantSettings:
        env = env or Env()
        worker = env.choice("PARTICIPANT_WORKER", "batch", WORKERS)
        return cls(
            database_url=database_url(
                env.str("PARTICIPANT_DATABASE_URL", DEFAULT_DATABASE_URL),
                "SAGABOX_PARTICIPANT_DATABASE_URL",
            ),
            amqp_url=amqp_url(env.str("AMQP_URL", DEFAULT_AMQP_URL), "SAGABOX_AMQP_URL"),
            processes=env.int("PARTICIPANT_PROCESSES", 1, minimum=1),
            worker=worker,
            batch_size=env.int("PARTICIPANT_BATCH_SIZE", 32, minimum=1),
            threads=env.int("PARTICIPANT_THREADS", 8, minimum=1),
            publish=env.choice("PARTICIPANT_PUBLISH", default_publisher(worker), PUBLISHERS),
            publish_lease=env.float(
                "PARTICIPANT_PUBLISH_LEASE", DEFAULT_PUBLISH_LEASE, minimum=0.1
            ),
            max_retries=env.int("PARTICIPANT_MAX_RETRIES", 5),
            min_backoff_ms=env.int("PARTICIPANT_MIN_BACKOFF_MS", 1000, minimum=1),
            max_backoff_ms=env.int("PARTICIPANT_MAX_BACKOFF_MS", 300_000, minimum=1),
            inbox_retention_seconds=env.float(
                "INBOX_RETENTION_SECONDS", DEFAULT_RETENTION_SECONDS, minimum=1.0
            ),
            inbox_purge_interval_seconds=env.float(
                "INBOX_PURGE_INTERVAL_SECONDS", 300.0, minimum=1.0
            ),
            quorum_queues=env.bool("QUORUM_QUEUES", False),
            quorum_delivery_limit=env.int(
                "QUORUM_DELIVERY_LIMIT", DEFAULT_DELIVERY_LIMIT, minimum=1
            ),
            log_level=env.str("LOG_LEVEL", "INFO"),
            log_file=env.raw("LOG_FILE") or None,
            metrics_port=env.int("METRICS_PORT", 0),
        )

    def worker_config(self) -> WorkerConfig:
        return WorkerConfig(
            database_url=self.database_url,
            amqp_url=self.amqp_url,
            worker=self.worker,
            batch_size=self.batch_size,
            threads=self.threads,
            publish=self.publish,
            publish_lease=self.publish_lease,
            retention=timedelta(seconds=self.inbox_retention_seconds),
            purge_interval=self.inbox_purge_interval_seconds,
            retries=RetryPolicy(
                max_retries=self.max_retries,
                min_backoff_ms=self.min_backoff_ms,
                max_backoff_ms=self.max_backoff_ms,
            ),
            quorum_queues=self.quorum_queues,
            quorum_delivery_limit=self.quorum_delivery_limit,
        )
