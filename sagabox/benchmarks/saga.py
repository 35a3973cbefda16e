"""sagabox itself under load: the relay, the orchestrator and one worker per service.

The services ``place_order`` needs (inventory, payment, shipping, loyalty) each get
their own database, the orchestrator its own, and a RabbitMQ vhost; the processes run
as in production (sagabox/supervisor.py), built by ``sagabox up``'s ``specs``, with N
replicas of each for ``--replicas``. The driver starts sagas through
``Orchestrator.start`` (one commit each) and learns they ended from a ``SagaWaiter``
(woken by the orchestrator's NOTIFY); its CPU, the waiter's status reads and its
backends count as sagabox's, as a peer's driver counts as the peer's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pika.exceptions
from sqlalchemy import Engine

import migrations
from orchestrator import Orchestrator, SagaWaiter, StartPublisher, WaitMark, WaitTimeoutError
from orchestrator.store import make_engine
from outbox_relay import vhosts
from participants.examples.checks import SagaOutcome, Seed, check, seed
from participants.examples.sagas import registry
from sagabox.benchmarks import cpu, drive, store, workload
from sagabox.benchmarks.drive import SAGA_TIMEOUT, Run, closed_loop, open_loop
from sagabox.benchmarks.errors import BenchError
from sagabox.benchmarks.result import Measured, Retention, SystemResult, unexpected
from sagabox.settings.orchestrator import OrchestratorSettings
from sagabox.settings.participant import ParticipantSettings
from sagabox.supervisor import Supervisor
from sagabox.up import DEFAULT_SAGAS, Replicas, UpConfig, specs

SERVICES = ("inventory", "payment", "shipping", "loyalty")
NAMES = ("orchestrator", *SERVICES)
# An idle backend flushes its statistics at most 10 s late (PGSTAT_IDLE_INTERVAL).
STATS_SETTLE = 11.0


# Seconds between checks that sagabox's processes live, while a saga is waited for.
# Each check ends a SagaWaiter.wait with a status read: checked every half second,
# sagas slower than that (at concurrency 64 most of them) cost the orchestrator's
# database a read, a commit and a round trip each time, and the run's figures with it.
LIVENESS_INTERVAL = 5.0


class _Waiter:
    """Waits for a saga to settle (orchestrator.waiting.SagaWaiter, woken by the
    orchestrator's NOTIFY), checking every LIVENESS_INTERVAL that sagabox's processes live."""

    def __init__(self, waiter: SagaWaiter, dead: Callable[[], object]) -> None:
        self.waiter = waiter
        self.dead = dead

    def wait(self, saga_id: str, timeout: float, since: WaitMark) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.waiter.wait(saga_id, LIVENESS_INTERVAL, since=since)
            except WaitTimeoutError:
                if dead := self.dead():
                    raise BenchError(f"sagabox processes died: {dead}") from None
                if time.monotonic() > deadline:
                    raise BenchError(f"saga {saga_id} did not end within {timeout} s") from None


# Connections per database of the benchmark's client, at most.
CLIENT_POOL = 24


class _Live:
    """What a run holds while sagabox runs: pools, the poller, the processes, saga ids."""

    def __init__(self, bench: SagaboxBench, amqp: str, concurrency: int, log_dir: Path) -> None:
        self.amqp = amqp
        self.timeout = bench.timeout
        # A start holds its connection for one round trip, so a few serve any number of
        # threads. A pool as large as the concurrency, and as many again in overflow,
        # outgrew PostgreSQL's 100 connections at concurrency 128 now and then; an
        # overflow opens and closes connections in bursts (a backend each time).
        pool = min(max(2, concurrency), CLIENT_POOL)
        self.engines = {n: make_engine(bench.url(n), pool_size=pool, max_overflow=0) for n in NAMES}
        self.saga_waiter = SagaWaiter(bench.url("orchestrator"))
        self.supervisor = Supervisor(log_dir)
        self.waiter = _Waiter(self.saga_waiter, self.supervisor.dead)
        # As an application that starts sagas would with orchestrator.starts: its thread
        # publishes the first commands (its CPU is the client's).
        self.starts = (
            StartPublisher(self.engines["orchestrator"], amqp) if bench.starts == "direct" else None
        )
        self.orchestrator = Orchestrator(
            self.engines["orchestrator"], registry(), starts=self.starts
        )
        self.version = bench.version
        self.started: list[str] = []

    def run_one(self, index: int) -> tuple[str, str]:
        # As an application that starts a saga and waits for it would: no status read.
        mark = self.saga_waiter.mark()
        saga_id = self.orchestrator.start(
            "place_order", workload.order(index), version=self.version
        )
        self.started.append(saga_id)
        return saga_id, self.waiter.wait(saga_id, self.timeout, mark)

    def close(self) -> None:
        if self.starts is not None:
            self.starts.close()  # before the processes: it deletes what was confirmed
        self.supervisor.stop_all()
        self.saga_waiter.close()
        for engine in self.engines.values():
            engine.dispose()


@dataclass
class SagaboxBench:
    admin_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    amqp_host: str = "127.0.0.1:5672"
    prefix: str = "sagabox_bench"
    log_level: str = "WARNING"
    threads: int = 4
    # place_order v1 (orchestrated) or v3 (the same steps on a routing slip).
    version: int = 3
    # "direct": the client publishes each saga's first command (orchestrator.starts);
    # "relay": the relay does.
    starts: str = "direct"
    timeout: float = SAGA_TIMEOUT
    keep: bool = False
    settle: float = STATS_SETTLE
    say: Callable[[str], None] = print
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sagabox-bench-")))

    def database(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def url(self, name: str) -> str:
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{self.database(name)}"

    def run(
        self,
        count: int,
        concurrency: int,
        *,
        rate: float | None = None,
        sweep: tuple[int, ...] = (),
        sweep_count: int = 0,
        warmup: int = 20,
        preload: int = 0,
        replicas: int = 1,
    ) -> SystemResult:
        """Warm up, run the sweep and the open loop, then the measured closed loop.

        With ``preload``, that many finished sagas and their history are inserted first;
        with ``replicas``, that many orchestrators, relays and workers per service run.
        """
        sweeps = {c: drive.sweep_count(sweep_count, c) for c in sweep}
        total = warmup + count + sum(sweeps.values()) + (count if rate else 0)
        initial = workload.seed_for(total)
        self._prepare((*NAMES, "accounting"), initial)
        live: _Live | None = None
        try:
            if preload:
                self.say(f"sagabox: preloading {preload:,} finished sagas and their history")
                store.preload(self.url("orchestrator"), preload)
            log_dir = self.log_dir if replicas == 1 else self.log_dir / f"replicas-{replicas}"
            live = _Live(self, self._vhost(), concurrency, log_dir)
            with live.supervisor:
                self._start(live, replicas)
                self.say(f"sagabox: warming up on {warmup} sagas (logs in {log_dir})")
                closed_loop(live.run_one, warmup, min(concurrency, 4))
                first = warmup
                runs: dict[int, Run] = {}
                for c, n in sweeps.items():
                    self.say(f"sagabox: {n} sagas at concurrency {c}")
                    runs[c] = closed_loop(live.run_one, n, c, first)
                    first += n
                opened = None
                if rate:
                    self.say(f"sagabox: open loop, {count} sagas at {rate:g}/s")
                    opened = open_loop(live.run_one, count, rate, first)
                    first += count
                main = self._measure(live, count, concurrency, first)
                dead = live.supervisor.dead()
            live.close()  # stopped processes and closed pools flush their statistics
            after = store.commits_by_database(self.admin_url, self.databases())
            main.commit_split = {
                db.removeprefix(f"{self.prefix}_"): n - main.commit_split.get(db, 0)
                for db, n in after.items()
            }
            main.commits = sum(main.commit_split.values())
            main.messages = store.messages(self.url("orchestrator"), main.run.ids)
            problems = self._problems(live.engines, initial, live.started)
            for r in (*runs.values(), *([opened] if opened else []), main.run):
                problems += unexpected(r, workload.expected)
            if dead:
                problems.append(f"processes died during the run: {dead}")
            config = (
                f"place_order v{self.version}{' (routing slip)' if self.version == 3 else ''}, "
                f"{_processes(replicas)} ({_worker(self.threads)}), "
                f"first commands published by {_starts(self.starts)}, log level {self.log_level}"
            )
            name = "sagabox" if replicas == 1 else f"sagabox x{replicas}"
            if preload:
                name, config = f"{name}+preload", f"{config}, {preload:,} finished sagas preloaded"
            sizes = store.table_sizes(self.url("orchestrator"))
            retention = self._retention() if preload else None
            return SystemResult(
                name, config, main, runs, opened, problems, sizes, replicas, retention
            )
        finally:
            if live is not None:
                live.close()
            if not self.keep:
                self.drop()

    def databases(self) -> list[str]:
        return [self.database(n) for n in NAMES]

    def _measure(self, live: _Live, count: int, concurrency: int, first: int) -> Measured:
        """The measured closed loop; ``commits`` is the baseline until the processes stop."""
        self.say(f"sagabox: settling {self.settle:g} s so every backend flushes its stats")
        time.sleep(self.settle)
        groups = self._cpu_groups(live.supervisor)
        before_cpu = cpu.sample(groups)
        before = store.commits_by_database(self.admin_url, self.databases())
        self.say(f"sagabox: {count} sagas at concurrency {concurrency} (measured)")
        run = closed_loop(live.run_one, count, concurrency, first)
        used = cpu.delta(before_cpu, cpu.sample(groups))
        # The baseline per database rides in commit_split until the processes stopped.
        return Measured(run, 0, used, 0, before)

    def _cpu_groups(self, supervisor: Supervisor) -> dict[str, list[int] | str]:
        # One group per component (every replica of it), so the report can show where
        # sagabox's own CPU goes: "relay-1" and "relay-2" both count as "relay". The
        # client is this process: its threads start the sagas and wait for them (the
        # SagaWaiter), as a peer's driver threads do in the peer's process, which
        # counts them.
        components: dict[str, list[int]] = {"client": [os.getpid()]}
        for name in supervisor.processes:
            components.setdefault(name.rpartition("-")[0], []).append(supervisor.pid(name))
        return {"postgres": "postgres", "rabbitmq": "beam.smp", **components}

    def _retention(self, keep: float = 3600.0) -> Retention:
        """Run the orchestrator's retention job as `SAGABOX_SAGA_RETENTION_SECONDS=3600`
        would: the preloaded sagas ended a day ago and go; this run's stay."""
        engine = make_engine(self.url("orchestrator"), pool_size=1)
        try:
            orchestrator = Orchestrator(engine, registry())
            started, purged = time.perf_counter(), 0
            while (n := orchestrator.purge_finished(keep, 10_000)) > 0:
                purged += n
            seconds = time.perf_counter() - started
        finally:
            engine.dispose()
        return Retention(purged, seconds, store.row_counts(self.url("orchestrator")))

    def _problems(
        self,
        engines: Mapping[str, Engine],
        initial: Seed,
        started: list[str],
    ) -> list[str]:
        rows = store.statuses(self.url("orchestrator"), started)
        outcomes = {
            i: SagaOutcome(name, version, status) for i, (name, status, version) in rows.items()
        }
        accounting = make_engine(self.url("accounting"), pool_size=1)
        try:
            problems = check({**engines, "accounting": accounting}, initial, outcomes)
        finally:
            accounting.dispose()
        if len(outcomes) != len(started):
            problems.append(f"{len(started) - len(outcomes)} started saga(s) not found")
        return problems

    def _prepare(self, names: tuple[str, ...], initial: Seed) -> None:
        for name in names:
            store.recreate_database(self.admin_url, self.database(name))
            url = self.url(name)
            branches = (
                ["orchestrator"] if name == "orchestrator" else ["participant", f"example_{name}"]
            )
            for branch in branches:
                migrations.upgrade(url, branch)
        engines = {n: make_engine(self.url(n), pool_size=1) for n in ("inventory", "payment")}
        try:
            seed(engines, initial)
        finally:
            for engine in engines.values():
                engine.dispose()

    def _start(self, live: _Live, replicas: int) -> None:
        for spec in specs(self.up_config(live.amqp, replicas)):
            live.supervisor.start(spec)
        if live.starts is not None:
            # Until the workers declared their queues, RabbitMQ returns what is published
            # to them (the relay then declares and publishes it): not the steady state.
            _wait_for_queues(live.amqp, SERVICES)
            live.starts.open()

    def up_config(self, amqp_url: str, replicas: int = 1) -> UpConfig:
        """The processes ``sagabox up`` would run here, with a quieter log level."""
        return UpConfig(
            orchestrator_url=self.url("orchestrator"),
            participant_urls={s: self.url(s) for s in SERVICES},
            amqp_url=amqp_url,
            replicas=Replicas(orchestrator=replicas, relay=replicas, participants=replicas),
            sagas=DEFAULT_SAGAS,
            threads=self.threads,
            env={"SAGABOX_LOG_LEVEL": self.log_level},
        )

    def _vhost(self) -> str:
        vhosts.recreate(self.prefix)
        return vhosts.url(self.prefix, self.amqp_host)

    def drop(self) -> None:
        for name in ("orchestrator", *SERVICES, "accounting"):
            store.drop_database(self.admin_url, self.database(name))
        vhosts.delete(self.prefix)


def _processes(replicas: int) -> str:
    if replicas == 1:
        return f"relay + orchestrator + {len(SERVICES)} workers"
    return f"{replicas} relays + {replicas} orchestrators + {replicas} x {len(SERVICES)} workers"


def _wait_for_queues(amqp_url: str, queues: tuple[str, ...], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    # pika logs each refused passive declare as a warning: here it is the expected answer.
    quiet = logging.getLogger("pika.channel")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        _poll_queues(amqp_url, list(queues), deadline, timeout)
    finally:
        quiet.setLevel(level)


def _poll_queues(amqp_url: str, missing: list[str], deadline: float, timeout: float) -> None:
    with contextlib.closing(pika.BlockingConnection(pika.URLParameters(amqp_url))) as conn:
        while missing:
            channel = conn.channel()
            try:
                while missing:
                    channel.queue_declare(missing[0], passive=True)
                    missing.pop(0)
            except pika.exceptions.ChannelClosedByBroker:
                if time.monotonic() > deadline:
                    raise BenchError(f"no queue {missing[0]!r} after {timeout} s") from None
                time.sleep(0.1)


def _starts(starts: str) -> str:
    return "the client (StartPublisher)" if starts == "direct" else "the relay"


def _worker(threads: int) -> str:
    settings = ParticipantSettings.from_env()
    commands = (
        "commands published by the orchestrator (direct)"
        if OrchestratorSettings.from_env().publish == "direct"
        else "commands published by the relay"
    )
    if settings.worker == "batch":
        replies = (
            "replies by the workers (direct)"
            if settings.publish == "direct"
            else "replies by the relay"
        )
        return (
            f"batch worker, up to {settings.batch_size} commands per transaction, "
            f"{commands}, {replies}"
        )
    return f"threads worker, {threads} threads, {commands}, replies by the relay"
