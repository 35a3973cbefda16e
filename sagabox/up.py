"""``sagabox up``: every sagabox process on this machine, restarted when one dies.

A local stand-in for a service manager: it starts the orchestrator(s), the relay(s)
and the example participants' workers as real processes against databases that
already exist, each logging to its own file, starts again any process that dies
(with backoff: ``supervisor.RestartPolicy``), and stops them all on Ctrl-C or
SIGTERM (SIGTERM to each, a bounded wait, then SIGKILL).

Databases (docs/deploy.md):

- the orchestrator's: ``SAGABOX_DATABASE_URL``;
- each service's: ``SAGABOX_UP_PARTICIPANT_DATABASE_URLS`` as ``service=url,...``;
  a service it does not name uses the orchestrator's URL with the database name
  suffixed by ``_<service>`` (``.../sagabox`` -> ``.../sagabox_inventory``).

Every relay serves all of these databases; every process gets this process's
environment plus its own database URL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import Engine
from sqlalchemy.orm import Session

import migrations
from orchestrator.store import make_engine
from outbox_relay.errors import ConfigurationError
from participants.examples import SERVICES, inventory
from participants.examples.checks import Seed, seed
from sagabox.commands.db import create_database
from sagabox.settings import (
    DEFAULT_AMQP_URL,
    DEFAULT_DATABASE_URL,
    Env,
    amqp_url,
    database_url,
    libpq_url,
    mask_url,
)
from sagabox.supervisor import ProcessSpec, RestartPolicy, Supervisor, sagabox_argv

COMPONENTS = ("orchestrator", "relay", "participants")
DEFAULT_SAGAS = "participants.examples.sagas:registry"
# What --setup seeds: the demo's shelves and accounts, larger.
SETUP_SEED = Seed(
    stock={"apple": 10_000, "pear": 2_000},
    balances={"alice": 10_000_000, "bob": 50, "carol": 2_000_000, "dave": 10_000_000},
)


@dataclass(frozen=True, slots=True)
class Replicas:
    """How many processes of each component: orchestrators, relays, workers per service."""

    orchestrator: int = 1
    relay: int = 1
    participants: int = 1

    @classmethod
    def parse(cls, text: str) -> Replicas:
        """``orchestrator=2,relay=2,participants=2``; a component left out keeps 1."""
        counts: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name.strip() not in COMPONENTS:
                raise ConfigurationError(
                    f"--replicas: {item!r} is not COMPONENT=N (components: {', '.join(COMPONENTS)})"
                )
            try:
                count = int(value)
            except ValueError:
                raise ConfigurationError(f"--replicas: {item!r}: N must be an integer") from None
            if count < 0:
                raise ConfigurationError(f"--replicas: {item!r}: N must be >= 0")
            counts[name.strip()] = count
        return cls(**counts)


@dataclass(frozen=True, slots=True)
class UpConfig:
    """Where everything runs: databases (libpq URLs), the broker, the process counts."""

    orchestrator_url: str
    participant_urls: Mapping[str, str]
    amqp_url: str
    replicas: Replicas = field(default_factory=Replicas)
    sagas: str = DEFAULT_SAGAS
    threads: int = 4
    # More environment for every process (chaos runs arm failpoints this way).
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def database_urls(self) -> list[str]:
        return [self.orchestrator_url, *self.participant_urls.values()]

    @classmethod
    def from_env(
        cls,
        env: Env,
        replicas: Replicas,
        services: Sequence[str] = SERVICES,
        threads: int = 4,
    ) -> UpConfig:
        unknown = sorted(set(services) - set(SERVICES))
        if unknown:
            raise ConfigurationError(
                f"--services: unknown service(s) {', '.join(unknown)}; known: {', '.join(SERVICES)}"
            )
        orchestrator = libpq_url(
            database_url(env.str("DATABASE_URL", DEFAULT_DATABASE_URL), "SAGABOX_DATABASE_URL")
        )
        given = parse_service_urls(env.raw("UP_PARTICIPANT_DATABASE_URLS") or "")
        return cls(
            orchestrator_url=orchestrator,
            participant_urls={s: given.get(s) or sibling_url(orchestrator, s) for s in services},
            amqp_url=amqp_url(env.str("AMQP_URL", DEFAULT_AMQP_URL), "SAGABOX_AMQP_URL"),
            replicas=replicas,
            sagas=env.str("SAGAS", DEFAULT_SAGAS),
            threads=threads,
        )


def parse_service_urls(text: str) -> dict[str, str]:
    """``inventory=postgresql://...,payment=postgresql://...`` as a dict of libpq URLs."""
    variable = "SAGABOX_UP_PARTICIPANT_DATABASE_URLS"
    urls: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        service, sep, url = item.partition("=")
        if not sep:  # say nothing of the item: it may be a URL with a password
            raise ConfigurationError(f"{variable}: expected service=url items, comma-separated")
        if service not in SERVICES:
            raise ConfigurationError(
                f"{variable}: unknown service {service!r}; known: {', '.join(SERVICES)}"
            )
        urls[service] = libpq_url(database_url(url, variable))
    return urls


def sibling_url(url: str, service: str) -> str:
    """``url`` with its database name suffixed by ``_<service>`` (query string kept)."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/") or "sagabox"
    return urlunsplit(parts._replace(path=f"/{name}_{service}"))


def specs(config: UpConfig) -> list[ProcessSpec]:
    """One ProcessSpec per process: orchestrator-1.., relay-1.., <service>-1.."""
    common = {**config.env, "SAGABOX_AMQP_URL": config.amqp_url}
    out: list[ProcessSpec] = []
    for i in range(1, config.replicas.orchestrator + 1):
        env = {
            **common,
            "SAGABOX_DATABASE_URL": config.orchestrator_url,
            "SAGABOX_SAGAS": config.sagas,
        }
        out.append(ProcessSpec(f"orchestrator-{i}", sagabox_argv("orchestrator"), env))
    relay_env = {**common, "SAGABOX_RELAY_DATABASE_URLS": ",".join(config.database_urls)}
    for i in range(1, config.replicas.relay + 1):
        out.append(ProcessSpec(f"relay-{i}", sagabox_argv("relay"), relay_env))
    for service, url in config.participant_urls.items():
        argv = sagabox_argv(
            "participant", f"participants.examples.{service}", "--threads", str(config.threads)
        )
        env = {**common, "SAGABOX_PARTICIPANT_DATABASE_URL": url}
        for i in range(1, config.replicas.participants + 1):
            out.append(ProcessSpec(f"{service}-{i}", argv, env))
    return out


def setup(config: UpConfig, initial: Seed = SETUP_SEED) -> None:
    """Create and migrate every database, seed the example services once (idempotent)."""
    create_database(config.orchestrator_url)
    migrations.upgrade(config.orchestrator_url, "orchestrator")
    for service, url in config.participant_urls.items():
        create_database(url)
        for branch in ("participant", f"example_{service}"):
            migrations.upgrade(url, branch)
    engines = {s: make_engine(url, pool_size=1) for s, url in config.participant_urls.items()}
    try:
        if {"inventory", "payment"} <= engines.keys() and not _seeded(engines["inventory"]):
            seed(engines, initial)
    finally:
        for engine in engines.values():
            engine.dispose()


def _seeded(engine: Engine) -> bool:
    with Session(engine) as session:
        return inventory.available(session, "apple") + inventory.reserved(session, "apple") > 0


@dataclass
class Up:
    """Runs ``specs(config)`` under a restarting Supervisor until ``stop`` is set."""

    config: UpConfig
    log_dir: Path
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    stop_timeout: float = 15.0
    say: Callable[[str], None] = print
    poll_interval: float = 0.2
    supervisor: Supervisor = field(init=False)

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.log_dir, restart_policy=self.policy)

    def start(self) -> None:
        self.say(f"sagabox up: orchestrator database {mask_url(self.config.orchestrator_url)}")
        for service, url in self.config.participant_urls.items():
            self.say(f"sagabox up: {service} database {mask_url(url)}")
        for spec in specs(self.config):
            process = self.supervisor.start(spec)
            log = self.supervisor.log_file(spec.name)
            self.say(f"started {spec.name} (pid {process.pid}), logs: {log}")

    def watch(self, stop: threading.Event) -> None:
        """Restart what dies until ``stop`` is set."""
        while not stop.wait(self.poll_interval):
            for restart in self.supervisor.tick():
                self.say(
                    f"restarted {restart.name} (exit {restart.exit_code}, "
                    f"failure {restart.failures} in a row), pid {restart.pid}"
                )

    def stop(self) -> dict[str, int | None]:
        self.say(f"stopping {len(self.supervisor.processes)} processes")
        codes = self.supervisor.stop_all(self.stop_timeout)
        self.say("stopped: " + ", ".join(f"{n}={c}" for n, c in codes.items()))
        return codes

    def run(self, stop: threading.Event) -> int:
        """Start everything, restart what dies, stop everything once ``stop`` is set."""
        try:
            self.start()
            self.watch(stop)
        finally:
            self.stop()
        return 0
