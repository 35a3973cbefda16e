"""Settings of the ``sagabox relay`` process (docs/relay.md has the full table)."""

from __future__ import annotations

from dataclasses import dataclass

from outbox_relay.relay import RelayConfig
from outbox_relay.topology import DEFAULT_DELIVERY_LIMIT, Topology
from sagabox.settings import (
    DEFAULT_AMQP_URL,
    DEFAULT_DATABASE_URL,
    Env,
    amqp_url,
    database_url,
    libpq_url,
)


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Everything the relay reads from ``SAGABOX_*`` variables, validated."""

    database_urls: tuple[str, ...]
    amqp_url: str
    batch_size: int = 500
    pipeline_depth: int = 2
    active_poll_interval: float = 0.01
    active_poll_max_interval: float = 0.05
    idle_poll_interval: float = 1.0
    active_window: float = 0.2
    confirm_timeout: float = 30.0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    reconnect_backoff_max: float = 5.0
    shutdown_timeout: float = 10.0
    exclusive: bool = True
    standby_poll_interval: float = 1.0
    takeover_after: float = 10.0
    quorum_queues: bool = False
    quorum_delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    log_level: str = "INFO"
    log_file: str | None = None
    metrics_port: int = 0
    metrics_interval: float = 5.0

    @classmethod
    def from_env(cls, env: Env | None = None) -> RelaySettings:
        env = env or Env()
        fallback = env.str("DATABASE_URL", DEFAULT_DATABASE_URL)
        urls = env.list("RELAY_DATABASE_URLS", [fallback])
        variable = "SAGABOX_RELAY_DATABASE_URLS"
        return cls(
            database_urls=tuple(libpq_url(database_url(url, variable)) for url in urls),
            amqp_url=amqp_url(env.str("AMQP_URL", DEFAULT_AMQP_URL), "SAGABOX_AMQP_URL"),
            batch_size=env.int("RELAY_BATCH_SIZE", 500, minimum=1),
            pipeline_depth=env.int("RELAY_PIPELINE_DEPTH", 2, minimum=1),
            active_poll_interval=env.float("RELAY_ACTIVE_POLL_INTERVAL", 0.01, minimum=0.001),
            active_poll_max_interval=env.float(
                "RELAY_ACTIVE_POLL_MAX_INTERVAL", 0.05, minimum=0.001
            ),
            idle_poll_interval=env.float("RELAY_IDLE_POLL_INTERVAL", 1.0, minimum=0.01),
            # Writers debounce NOTIFYs for 50 ms: a shorter window would strand rows.
            active_window=env.float("RELAY_ACTIVE_WINDOW", 0.2, minimum=0.06),
            confirm_timeout=env.float("RELAY_CONFIRM_TIMEOUT", 30.0, minimum=0.1),
            retry_backoff=env.float("RELAY_RETRY_BACKOFF", 1.0),
            retry_backoff_max=env.float("RELAY_RETRY_BACKOFF_MAX", 300.0),
            reconnect_backoff_max=env.float("RELAY_RECONNECT_BACKOFF_MAX", 5.0, minimum=0.01),
            shutdown_timeout=env.float("RELAY_SHUTDOWN_TIMEOUT", 10.0),
            exclusive=env.bool("RELAY_EXCLUSIVE", True),
            standby_poll_interval=env.float("RELAY_STANDBY_POLL_INTERVAL", 1.0, minimum=0.01),
            # The leader beats every second: a shorter silence is no sign of a freeze.
            takeover_after=env.float("RELAY_TAKEOVER_AFTER", 10.0, minimum=2.0),
            quorum_queues=env.bool("QUORUM_QUEUES", False),
            quorum_delivery_limit=env.int(
                "QUORUM_DELIVERY_LIMIT", DEFAULT_DELIVERY_LIMIT, minimum=1
            ),
            log_level=env.str("LOG_LEVEL", "INFO"),
            log_file=env.raw("LOG_FILE") or None,
            metrics_port=env.int("METRICS_PORT", 0),
            metrics_interval=env.float("METRICS_INTERVAL", 5.0, minimum=0.1),
        )

    def relay_config(self) -> RelayConfig:
        """The library-level configuration the relay runs with."""
        return RelayConfig(
            database_urls=self.database_urls,
            amqp_url=self.amqp_url,
            batch_size=self.batch_size,
            pipeline_depth=self.pipeline_depth,
            active_poll_interval=self.active_poll_interval,
            active_poll_max_interval=max(self.active_poll_max_interval, self.active_poll_interval),
            idle_poll_interval=self.idle_poll_interval,
            active_window=self.active_window,
            confirm_timeout=self.confirm_timeout,
            retry_backoff=self.retry_backoff,
            retry_backoff_max=self.retry_backoff_max,
            reconnect_backoff_max=self.reconnect_backoff_max,
            shutdown_timeout=self.shutdown_timeout,
            exclusive=self.exclusive,
            standby_poll_interval=self.standby_poll_interval,
            takeover_after=self.takeover_after,
            # The backlog query only runs when someone scrapes the metrics.
            backlog_interval=self.metrics_interval if self.metrics_port else 0.0,
            topology=Topology(quorum=self.quorum_queues, delivery_limit=self.quorum_delivery_limit),
        )
