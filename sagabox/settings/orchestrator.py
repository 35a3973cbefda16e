"""Settings of the orchestrator process and of the saga CLI commands."""

from __future__ import annotations

from dataclasses import dataclass, field

from outbox_relay.errors import ConfigurationError
from outbox_relay.message import DEFAULT_REPLY_QUEUE, is_valid_name
from outbox_relay.topology import DEFAULT_DELIVERY_LIMIT, Topology
from sagabox.settings import (
    DEFAULT_AMQP_URL,
    DEFAULT_DATABASE_URL,
    Env,
    amqp_url,
    database_url,
)

DEFAULT_SAGAS = "participants.examples.sagas:registry"
PUBLISHERS = ("direct", "relay")


@dataclass(frozen=True, slots=True)
class OrchestratorSettings:
    """| variable | default | meaning |
    | SAGABOX_DATABASE_URL | postgresql://postgres@127.0.0.1:5432/sagabox | saga state + outbox |
    | SAGABOX_AMQP_URL | amqp://guest:guest@127.0.0.1:5672/%2F | RabbitMQ |
    | SAGABOX_SAGAS | participants.examples.sagas:registry | module:attribute of the Registry |
    | SAGABOX_REPLY_QUEUE | sagabox.replies | queue the participants reply to |
    | SAGABOX_BATCH_SIZE | 200 | replies applied per transaction at most |
    | SAGABOX_TIMER_INTERVAL | 0.25 | seconds between timer sweeps |
    | SAGABOX_REPLY_INBOX_RETENTION_SECONDS | 604800 (7 days) | how long reply ids are kept |
    | SAGABOX_REPLY_INBOX_PURGE_INTERVAL_SECONDS | 300 | how often old reply ids are purged |
    | SAGABOX_QUORUM_QUEUES / SAGABOX_QUORUM_DELIVERY_LIMIT | false / 20 | quorum reply queue |
    | SAGABOX_LOG_LEVEL / SAGABOX_LOG_FILE | INFO / none | logging |
    | SAGABOX_METRICS_PORT | 0 (off) | Prometheus metrics port |
    | SAGABOX_METRICS_INTERVAL | 5 | seconds between refreshes of the saga gauges |
    | SAGABOX_METRICS_LONG_RUNNING_SECONDS | 300 | age from which a saga counts as long-running |
    | SAGABOX_NOTIFY_SETTLED | true | NOTIFY settled sagas, for SagaWaiter (docs/sagas.md) |
    | SAGABOX_ORCHESTRATOR_PUBLISH | direct | direct: publish the commands of replies and timers |
    |   | | after the commit, the relay as the safety net; relay: the relay publishes all |
    | SAGABOX_ORCHESTRATOR_PUBLISH_LEASE | 10 | seconds a relay leaves such a row alone |
    """

    database_url: str
    amqp_url: str
    sagas: str
    reply_queue: str
    batch_size: int
    timer_interval: float
    log_level: str
    log_file: str | None
    reply_retention: float = 7 * 24 * 3600.0
    purge_interval: float = 300.0
    saga_retention: float = 0.0
    metrics_port: int = 0
    metrics_interval: float = 5.0
    long_running_seconds: float = 300.0
    notify_settled: bool = True
    publish: str = "direct"
    publish_lease: float = 10.0
    topology: Topology = field(default_factory=Topology)

    @classmethod
    def from_env(cls, env: Env | None = None) -> OrchestratorSettings:
        env = env or Env()
        reply_queue = env.str("REPLY_QUEUE", DEFAULT_REPLY_QUEUE)
        if not is_valid_name(reply_queue):
            raise ConfigurationError(
                f"SAGABOX_REPLY_QUEUE is not a valid queue name: {reply_queue!r}"
            )
        sagas = env.str("SAGAS", DEFAULT_SAGAS)
        if ":" not in sagas:
            raise ConfigurationError(
                "SAGABOX_SAGAS must be module:attribute, e.g. myapp.sagas:registry"
            )
        return cls(
            database_url=database_url(
                env.str("DATABASE_URL", DEFAULT_DATABASE_URL), "SAGABOX_DATABASE_URL"
            ),
            amqp_url=amqp_url(env.str("AMQP_URL", DEFAULT_AMQP_URL), "SAGABOX_AMQP_URL"),
            sagas=sagas,
            reply_queue=reply_queue,
            batch_size=env.int("BATCH_SIZE", 200, minimum=1),
            timer_interval=env.float("TIMER_INTERVAL", 0.25, minimum=0.01),
            topology=Topology(
                quorum=env.bool("QUORUM_QUEUES", False),
                delivery_limit=env.int("QUORUM_DELIVERY_LIMIT", DEFAULT_DELIVERY_LIMIT, minimum=1),
            ),
            log_level=env.str("LOG_LEVEL", "INFO"),
            log_file=env.raw("LOG_FILE") or None,
            reply_retention=env.float(
                "REPLY_INBOX_RETENTION_SECONDS", 7 * 24 * 3600.0, minimum=1.0
            ),
            purge_interval=env.float("REPLY_INBOX_PURGE_INTERVAL_SECONDS", 300.0, minimum=1.0),
            saga_retention=env.float("SAGA_RETENTION_SECONDS", 0.0, minimum=0.0),
            metrics_port=env.int("METRICS_PORT", 0),
            metrics_interval=env.float("METRICS_INTERVAL", 5.0, minimum=0.1),
            long_running_seconds=env.float("METRICS_LONG_RUNNING_SECONDS", 300.0),
            notify_settled=env.bool("NOTIFY_SETTLED", True),
            publish=env.choice("ORCHESTRATOR_PUBLISH", "direct", PUBLISHERS),
            publish_lease=env.float("ORCHESTRATOR_PUBLISH_LEASE", 10.0, minimum=0.1),
        )
