"""``sagabox chaos``: a steady load of place_order sagas while random faults hit the
system, then a verdict.

The whole system runs here as in ``sagabox up`` (several replicas of each process,
restarted when they die) against fresh databases and a fresh vhost. While the load
runs, faults drawn from ``--seed`` hit it: a process killed with SIGKILL, every
connection of one database terminated, every broker connection closed, a participant
worker frozen (SIGSTOP) for a few seconds, PostgreSQL restarted with
``-m immediate``, RabbitMQ's port blackholed (iptables DROP) or refused (REJECT) for a
few seconds. Then the run waits for every saga to end and
every outbox to drain, and judges it like the demo does
(``participants.examples.checks.check``, contiguous histories, empty outboxes).

The verdict is PASS, FAIL (an invariant broke) or INVALID: a run in which some kind
of fault never fired while sagas were in flight proved nothing about that kind, and a
run in which no inbox absorbed a duplicate or RabbitMQ never redelivered a message
never tested the machinery that makes effects happen once; neither can pass. The seed
fixes the orders, the faults and their times; the processes' own timing still varies,
so a seed replays the run's plan, not its every interleaving.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError

from orchestrator import Orchestrator, StoreError, make_engine
from orchestrator import store as orchestrator_store
from orchestrator.tables import saga
from outbox_relay import vhosts
from outbox_relay.errors import ConfigurationError
from outbox_relay.table import pending_rows
from participants.examples.checks import SagaOutcome, Seed, check
from participants.examples.sagas import registry
from sagabox import faults
from sagabox.supervisor import RestartPolicy
from sagabox.up import Replicas, Up, UpConfig, setup

SERVICES = ("inventory", "payment", "shipping", "loyalty")
FAULT_KINDS = (
    "kill",
    "database_disconnect",
    "broker_disconnect",
    "pause",
    "postgres_restart",
    "broker_blackhole",
)
AMQP_PORT = 5672
SEED = Seed(stock={"apple": 1_000_000}, balances={"alice": 1_000_000_000, "bob": 50})
UNSETTLED = ("running", "compensating")
EXIT_PASS, EXIT_FAIL, EXIT_INVALID = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    sagas: int
    duration: float
    seed: int
    replicas: Replicas = field(default_factory=lambda: Replicas(2, 2, 2))
    threads: int = 2
    fault_interval: float = 2.5  # mean seconds between faults
    # Each pass through a commit-then-ack gap kills its process with this chance, so
    # that duplicates certainly reach the inboxes (a random SIGKILL rarely lands there).
    crash_probability: float = 0.01
    # place_order versions the load takes turns with: 1 orchestrated, 3 on a routing slip.
    versions: tuple[int, ...] = (1, 3)
    drain_timeout: float = 120.0
    admin_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    amqp_host: str = "127.0.0.1:5672"
    prefix: str = "sagabox_chaos"


@dataclass
class Report:
    started: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    unplanned: int = 0  # ended otherwise than planned: legitimate after a timeout
    faults: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    redeliveries: int = 0
    ignored_replies: int = 0
    violations: list[str] = field(default_factory=list)
    drain_seconds: float | None = None

    @property
    def never_fired(self) -> list[str]:
        return [kind for kind in FAULT_KINDS if not self.in_flight[kind]]

    @property
    def never_seen(self) -> list[str]:
        """The "sometimes" events the run must show to be worth anything."""
        seen = {"duplicates absorbed": self.duplicates, "redeliveries": self.redeliveries}
        return [name for name, n in seen.items() if not n]

    @property
    def verdict(self) -> str:
        if self.violations:
            return "FAIL"
        return "INVALID" if self.never_fired or self.never_seen else "PASS"

    def lines(self, config: ChaosConfig) -> list[str]:
        drain = "did not drain" if self.drain_seconds is None else f"{self.drain_seconds:.1f} s"
        rows = [
            ("sagas started", str(self.started)),
            ("  completed", str(self.outcomes["completed"])),
            ("  compensated", str(self.outcomes["compensated"])),
            ("  parked (failed)", str(self.outcomes["failed"])),
            ("  other than planned", str(self.unplanned)),
            *(
                (f"faults: {kind}", f"{self.faults[kind]} ({self.in_flight[kind]} in flight)")
                for kind in FAULT_KINDS
            ),
            ("duplicates absorbed", str(self.duplicates)),
            ("redeliveries", str(self.redeliveries)),
            ("late replies ignored", str(self.ignored_replies)),
            ("invariant violations", str(len(self.violations))),
            ("time to drain", drain),
        ]
        versions = ", ".join(f"v{v}" for v in config.versions)
        out = [
            f"sagabox chaos: seed {config.seed}, {config.sagas} sagas ({versions}) over "
            f"{config.duration:g} s"
        ]
        out += [f"  {name:<28}{value}" for name, value in rows]
        out += [f"  violation: {v}" for v in self.violations]
        if self.never_fired:
            out.append(f"  never fired with sagas in flight: {', '.join(self.never_fired)}")
        if self.never_seen:
            out.append(f"  never happened: {', '.join(self.never_seen)}")
        out.append(f"  verdict: {self.verdict}")
        return out

    @property
    def exit_code(self) -> int:
        return {"PASS": EXIT_PASS, "FAIL": EXIT_FAIL}.get(self.verdict, EXIT_INVALID)


def order(rng: random.Random, i: int) -> tuple[dict[str, Any], str]:
    """A random order and the outcome planned for it (bob cannot pay; no US shipping)."""
    customer = "bob" if rng.random() < 0.15 else "alice"
    country = "US" if rng.random() < 0.1 else "FR"
    amount = 900 if customer == "bob" else rng.randint(1, 500)
    expect = "completed" if customer == "alice" and country == "FR" else "compensated"
    data = {
        "order_id": f"chaos-{i}",
        "customer": customer,
        "sku": "apple",
        "qty": rng.randint(1, 3),
        "amount": amount,
        "country": country,
        "email": f"{customer}@example.com",
    }
    return data, expect


@dataclass
class Chaos:
    config: ChaosConfig
    log_dir: Path
    say: Callable[[str], None] = print
    rng: random.Random = field(init=False)
    urls: dict[str, str] = field(init=False)
    amqp_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.config.seed)
        base = self.config.admin_url.rpartition("/")[0]
        self.urls = {n: f"{base}/{self.config.prefix}_{n}" for n in ("orchestrator", *SERVICES)}
        self.amqp_url = vhosts.url(self.config.prefix, self.config.amqp_host)

    def run(self) -> Report:
        missing = [tool for tool in ("iptables", "pg_ctlcluster") if shutil.which(tool) is None]
        if missing:
            raise ConfigurationError(
                f"sagabox chaos needs {' and '.join(missing)} for its faults"
                " (Debian: apt-get install iptables postgresql-common) and runs as root"
            )
        self._prepare()
        up_config = UpConfig(
            orchestrator_url=self.urls["orchestrator"],
            participant_urls={s: self.urls[s] for s in SERVICES},
            amqp_url=self.amqp_url,
            replicas=self.config.replicas,
            threads=self.config.threads,
            env=crash_env(self.config),
        )
        setup(up_config, SEED)
        engines: dict[str, Engine] = {n: make_engine(u, pool_size=2) for n, u in self.urls.items()}
        engines["accounting"] = engines["orchestrator"]  # place_order has no fares
        up = Up(up_config, self.log_dir, RestartPolicy(initial=0.3), say=lambda _: None)
        stop = threading.Event()
        watcher = threading.Thread(target=up.watch, args=(stop,), daemon=True)
        report = Report()
        paused: set[int] = set()
        self._blackholes: list[list[str]] = []
        try:
            up.start()
            watcher.start()
            expected = self._load(up, engines, report, paused)
            self._drain(engines, expected, report)
        finally:
            for pid in paused:
                _signal(pid, signal.SIGCONT)
            for rule in list(self._blackholes):
                faults.unblock(rule, every_copy=False)
            stop.set()
            watcher.join(timeout=5)
            up.stop()
        try:
            self._judge(engines, expected, report)
        finally:
            for engine in {id(e): e for e in engines.values()}.values():
                engine.dispose()
        return report

    def _load(
        self, up: Up, engines: Mapping[str, Engine], report: Report, paused: set[int]
    ) -> dict[str, str]:
        orchestrator = Orchestrator(engines["orchestrator"], registry())
        expected: dict[str, str] = {}
        rate = self.config.sagas / self.config.duration
        kinds: list[str] = []
        started_at = time.monotonic()
        next_fault = started_at + self.rng.expovariate(1 / self.config.fault_interval)
        for i in range(self.config.sagas):
            data, expect = order(self.rng, i)
            saga_id = _retrying(
                lambda data=data, i=i: orchestrator.start(  # type: ignore[misc]
                    "place_order",
                    data,
                    version=self.config.versions[i % len(self.config.versions)],
                    idempotency_key=f"c{i}",
                )
            )
            expected[saga_id] = expect
            report.started += 1
            now = time.monotonic()
            # Slow faults (a PostgreSQL restart) eat the schedule on a slow machine:
            # the last starts of a run catch up on the kinds of the first round, so a
            # run of at least len(FAULT_KINDS) sagas fires every kind.
            unfired = len(FAULT_KINDS) - sum(report.faults.values())
            catch_up = unfired > 0 and self.config.sagas - i <= unfired
            if now >= next_fault or catch_up:
                if not kinds:  # every kind once per round, in an order the seed picks
                    kinds = list(FAULT_KINDS)
                    self.rng.shuffle(kinds)
                kind = kinds.pop()
                in_flight = _retrying(lambda: _unsettled(engines["orchestrator"])) > 0
                self._fault(kind, up, paused)
                report.faults[kind] += 1
                report.in_flight[kind] += int(in_flight)
                next_fault = now + self.rng.expovariate(1 / self.config.fault_interval)
            time.sleep(max(0.0, started_at + (i + 1) / rate - time.monotonic()))
        return expected

    def _fault(self, kind: str, up: Up, paused: set[int]) -> None:
        names = sorted(up.supervisor.processes)
        if kind == "kill":
            name = self.rng.choice(names)
            _signal(up.supervisor.pid(name), signal.SIGKILL)
            self.say(f"fault: killed {name}")
        elif kind == "database_disconnect":
            name = self.rng.choice(sorted(self.urls))
            faults.terminate_backends(self.config.admin_url, self.urls[name].rpartition("/")[2])
            self.say(f"fault: terminated the connections to {name}'s database")
        elif kind == "broker_disconnect":
            vhosts.rabbitmqctl(
                "close_all_connections", "--vhost", self.config.prefix, "sagabox chaos"
            )
            self.say("fault: closed every broker connection")
        elif kind == "postgres_restart":
            faults.restart_postgres()
            self.say("fault: restarted PostgreSQL (-m immediate)")
        elif kind == "broker_blackhole":
            # Silently dropped packets, the worst case for heartbeats; kept under the
            # steps' timeouts so that the plan's outcomes still hold.
            target = self.rng.choice(["DROP", "REJECT"])
            seconds = self.rng.uniform(2.0, 5.0)
            rule = faults.port_rule(AMQP_PORT, target)
            faults.block(rule)
            self._blackholes.append(rule)
            timer = threading.Timer(seconds, self._unblock_later, args=(rule,))
            timer.daemon = True
            timer.start()
            self.say(f"fault: RabbitMQ's port {target} for {seconds:.1f} s")
        else:
            name = self.rng.choice([n for n in names if n.split("-")[0] in SERVICES])
            pid = up.supervisor.pid(name)
            seconds = self.rng.uniform(1.0, 4.0)  # under the steps' 10 s timeout
            _signal(pid, signal.SIGSTOP)
            paused.add(pid)
            timer = threading.Timer(seconds, self._resume, args=(pid, paused))
            timer.daemon = True
            timer.start()
            self.say(f"fault: paused {name} for {seconds:.1f} s")

    def _unblock_later(self, rule: list[str]) -> None:
        if rule in self._blackholes:
            self._blackholes.remove(rule)
            faults.unblock(rule, every_copy=False)

    @staticmethod
    def _resume(pid: int, paused: set[int]) -> None:
        _signal(pid, signal.SIGCONT)
        paused.discard(pid)

    def _drain(
        self, engines: Mapping[str, Engine], expected: Mapping[str, str], report: Report
    ) -> None:
        started = time.monotonic()
        deadline = started + self.config.drain_timeout
        while time.monotonic() < deadline:
            try:
                if _unsettled(engines["orchestrator"]) == 0 and all(
                    _outbox_rows(e) == 0 for e in engines.values()
                ):
                    report.drain_seconds = time.monotonic() - started
                    return
            except Exception:  # a database terminated a moment ago answers again soon
                pass
            time.sleep(0.25)

    def _judge(
        self, engines: Mapping[str, Engine], expected: Mapping[str, str], report: Report
    ) -> None:
        with engines["orchestrator"].connect() as conn:
            rows = conn.execute(select(saga.c.id, saga.c.name, saga.c.version, saga.c.status))
            outcomes = {str(r.id): SagaOutcome(r.name, r.version, r.status) for r in rows}
        report.outcomes = Counter(outcomes[s].status for s in expected)
        report.unplanned = sum(
            1
            for s, e in expected.items()
            if outcomes[s].status in ("completed", "compensated") and outcomes[s].status != e
        )
        report.violations += check(engines, SEED, outcomes)
        if report.outcomes["failed"]:
            report.violations.append(f"{report.outcomes['failed']} saga(s) parked")
        report.violations += _history_gaps(engines["orchestrator"])
        for name, engine in engines.items():
            if (rows_left := _outbox_rows(engine)) and name != "accounting":
                report.violations.append(f"{name}: {rows_left} outbox rows never published")
        text = "\n".join(p.read_text(errors="replace") for p in self.log_dir.glob("*.log"))
        report.duplicates = len(re.findall(r"inbox_duplicate_skipped", text))
        report.redeliveries = _redeliveries(text)
        report.ignored_replies = len(re.findall(r"reply_ignored", text))

    def drop(self) -> None:
        """Remove the run's databases and vhost (a run keeps them to look at)."""
        self._drop_databases()
        vhosts.delete(self.config.prefix)

    def _drop_databases(self) -> None:
        with psycopg.connect(self.config.admin_url, autocommit=True) as conn:
            for url in self.urls.values():
                name = sql.Identifier(url.rpartition("/")[2])
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))

    def _prepare(self) -> None:
        """Fresh databases and a fresh vhost, so the checks judge this run alone."""
        self._drop_databases()
        vhosts.recreate(self.config.prefix)


def _retrying(call: Callable[[], Any], timeout: float = 60.0) -> Any:
    """``call()``, again while the database is away (a restart fault), up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except (StoreError, DBAPIError, psycopg.Error):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _signal(pid: int, signum: int) -> None:
    # It may have died meanwhile (another fault): then there is nothing to do.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _unsettled(engine: Engine) -> int:
    with engine.connect() as conn:
        return orchestrator_store.count_by_status(conn, UNSETTLED)


def _outbox_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return pending_rows(conn)


def _history_gaps(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return orchestrator_store.history_gaps(conn)


def _redeliveries(text: str) -> int:
    """Deliveries RabbitMQ made again, from the participants' and orchestrators' logs."""
    total = 0
    for line in text.splitlines():
        if "_redelivered" not in line:
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("event") == "message_redelivered":
                total += 1
            elif entry.get("event") == "replies_redelivered":
                total += int(entry.get("count", 0))
    return total


# The gaps where a crash makes a message arrive twice: after the commit, before the ack.
CRASH_POINTS = (
    "orchestrator.after_commit_before_ack",
    "relay.after_confirm_before_mark",
    "participant.after_commit_before_ack",
)


def crash_env(config: ChaosConfig) -> dict[str, str]:
    """The failpoint settings that make processes die in those gaps now and then."""
    if config.crash_probability <= 0:
        return {}
    armed = ",".join(f"{name}=exit@{config.crash_probability:g}" for name in CRASH_POINTS)
    return {"SAGABOX_FAILPOINTS": armed, "SAGABOX_FAILPOINTS_SEED": str(config.seed)}
