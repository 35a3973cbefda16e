"""The whole order system as real processes, for fault tests: start it, load it, hurt
it, wait for it to settle, and judge the result.

``System`` runs one orchestrator, one relay and one worker per order service
(inventory, payment, shipping, loyalty) under ``sagabox.supervisor``, each with its own
database copied from the migrated template, in the test's own vhost. A test starts a
few place_order sagas (some declined by design), does something nasty to a process or
a server, then calls ``settle()`` and ``assert_consistent()``: every saga ended as it
must, the business invariants hold (``participants.examples.checks.check``), every
outbox is empty and every saga's history is one contiguous sequence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import Engine, select

from orchestrator import Orchestrator, Registry, make_engine
from orchestrator import store as orchestrator_store
from orchestrator.tables import saga
from outbox_relay.table import pending_rows
from participants.examples.checks import SagaOutcome, Seed, check, seed
from sagabox import faults
from sagabox.settings.participant import DEFAULT_PUBLISH_LEASE
from sagabox.supervisor import ProcessSpec, Supervisor
from sagabox.up import Replicas, UpConfig, specs
from tests import servers

SERVICES = ("inventory", "payment", "shipping", "loyalty")
SEED = Seed(stock={"apple": 10_000}, balances={"alice": 10_000_000, "bob": 50})
TERMINAL = ("completed", "compensated")
# SAGABOX_PARTICIPANT_PUBLISH_LEASE's default: the longest a directly published row
# may wait for a relay after its publisher died.
LEASE_SECONDS = DEFAULT_PUBLISH_LEASE
#: The outcome expected of a saga whose steps may time out during the fault: either
#: end is right, as long as the invariants hold.
EITHER = "completed or compensated"


def order(i: int) -> tuple[dict[str, Any], str]:
    """The i-th order and the outcome it must reach: mostly completed, some compensated."""
    customer, amount, country, expect = "alice", 300, "FR", "completed"
    if i % 5 == 3:
        customer, amount, expect = "bob", 900, "compensated"  # payment declined
    elif i % 7 == 5:
        country, expect = "US", "compensated"  # no shipping there: refund, release
    data = {
        "order_id": f"order-{i}",
        "customer": customer,
        "sku": "apple",
        "qty": 1,
        "amount": amount,
        "country": country,
        "email": f"{customer}@example.com",
    }
    return data, expect


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


@contextlib.contextmanager
def databases(
    template: str, names: Sequence[str] = ("orchestrator", *SERVICES)
) -> Iterator[dict[str, str]]:
    """A fresh copy of the migrated template per component."""
    with contextlib.ExitStack() as stack:
        yield {
            name: stack.enter_context(servers.database_from(template, "sagabox_fault"))
            for name in names
        }


@dataclass
class System:
    """The processes, the engines to look at their databases, and the sagas started."""

    urls: Mapping[str, str]
    amqp_url: str
    log_dir: Path
    registry: Registry
    sagas: str = "participants.examples.sagas:registry"
    env: Mapping[str, str] = field(default_factory=dict)
    modules: Mapping[str, str] = field(default_factory=dict)
    threads: int = 2
    expected: dict[str, str] = field(default_factory=dict)
    supervisor: Supervisor = field(init=False)
    engines: dict[str, Engine] = field(init=False)
    orchestrator: Orchestrator = field(init=False)
    specs: dict[str, ProcessSpec] = field(init=False)
    _next: int = 0

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.log_dir)
        self.engines = {name: make_engine(url, pool_size=2) for name, url in self.urls.items()}
        # The example accounting service is not in place_order: its check sees no fare.
        self.engines.setdefault("accounting", self.engines["orchestrator"])
        self.orchestrator = Orchestrator(self.engines["orchestrator"], self.registry)
        config = UpConfig(
            orchestrator_url=self.urls["orchestrator"],
            participant_urls={s: self.urls[s] for s in SERVICES},
            amqp_url=self.amqp_url,
            replicas=Replicas(),
            sagas=self.sagas,
            threads=self.threads,
        )
        self.specs = {spec.name: spec for spec in specs(config)}
        for name, module in self.modules.items():
            url = self.urls[name]
            self.specs[f"{name}-1"] = ProcessSpec(
                f"{name}-1",
                [*self.specs["inventory-1"].argv[:3], "participant", module, "--threads", "2"],
                {"SAGABOX_AMQP_URL": self.amqp_url, "SAGABOX_PARTICIPANT_DATABASE_URL": url},
            )

    def start(self, env: Mapping[str, Mapping[str, str]] | None = None) -> None:
        """Start every process; ``env`` adds variables to some (by process name)."""
        seed(self.engines, SEED)
        for name in self.specs:
            self.start_one(name, (env or {}).get(name, {}))

    def start_one(self, name: str, env: Mapping[str, str] | None = None) -> None:
        """(Re)start one process, with this system's environment plus ``env``."""
        spec = self.specs[name]
        self.supervisor.start(
            dataclasses.replace(spec, env={**spec.env, **self.env, **(env or {})})
        )

    def pid(self, name: str) -> int:
        return self.supervisor.pid(name)

    def exited(self, name: str) -> int | None:
        return self.supervisor.dead().get(name)

    def load(self, count: int, *, may_time_out: bool = False, version: int = 1) -> None:
        """Start ``count`` place_order sagas now, remembering the outcome each must reach
        (``may_time_out``: a fault longer than a step's timeouts may compensate any;
        ``version`` 3 runs on a routing slip)."""
        for _ in range(count):
            data, expect = order(self._next)
            self.start_saga(
                "place_order", data, EITHER if may_time_out else expect, version=version
            )

    def start_saga(self, name: str, data: Mapping[str, Any], expect: str, version: int) -> str:
        saga_id = self.orchestrator.start(
            name, dict(data), version=version, idempotency_key=f"{name}-{self._next}"
        )
        self._next += 1
        self.expected[saga_id] = expect
        return saga_id

    def outcomes(self) -> dict[str, SagaOutcome]:
        with self.engines["orchestrator"].connect() as conn:
            rows = conn.execute(select(saga.c.id, saga.c.name, saga.c.version, saga.c.status))
            return {str(r.id): SagaOutcome(r.name, r.version, r.status) for r in rows}

    def count(self, status: str) -> int:
        return sum(1 for s in self.outcomes().values() if s.status == status)

    def settle(self, timeout: float = 60) -> None:
        """Wait until every saga started has ended and every outbox has drained.

        The outboxes drain while the processes run: a row a killed worker published
        itself but never saw confirmed stays leased (SAGABOX_PARTICIPANT_PUBLISH_LEASE,
        10 s) until a relay publishes it again, after its saga may have ended.
        """

        def settled() -> bool:
            try:
                statuses = self.outcomes()
            except Exception:  # the database may still be coming back
                return False
            return all(statuses[s].status in TERMINAL for s in self.expected)

        def all_drained() -> bool:
            try:
                return all(drained(engine) for engine in self.engines.values())
            except Exception:
                return False

        try:
            wait_for(settled, timeout, "every saga to end")
            wait_for(all_drained, LEASE_SECONDS + 20, "every outbox to drain")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs_tail()}") from None

    def assert_consistent(self) -> None:
        final = self.outcomes()
        wrong = {
            s: (final[s].status, e)
            for s, e in self.expected.items()
            if final[s].status != e and not (e == EITHER and final[s].status in TERMINAL)
        }
        assert not wrong, f"{len(wrong)} sagas ended otherwise than expected: {wrong}"
        assert check(self.engines, SEED, final) == []
        assert history_gaps(self.engines["orchestrator"]) == []
        for name, engine in self.engines.items():
            wait_for(partial(drained, engine), 15, f"{name}'s outbox to drain")
        wait_for(
            lambda: busy_queues(self.amqp_url) == {},
            15,
            "every main queue to be empty (no ready, no unacked message)",
        )

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> dict[str, int | None]:
        codes = self.supervisor.stop_all(15)
        for engine in {id(e): e for e in self.engines.values()}.values():
            engine.dispose()
        return codes


@contextlib.contextmanager
def running(system: System, env: Mapping[str, Mapping[str, str]] | None = None) -> Iterator[System]:
    try:
        system.start(env)
        yield system
    finally:
        system.stop()


def busy_queues(amqp_url: str) -> dict[str, tuple[int, int]]:
    """Main queues (not .DQ/.XQ) of the vhost holding ready or unacked messages."""
    vhost = unquote(urlsplit(amqp_url).path.lstrip("/")) or "/"
    listing = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_queues",
            "-p",
            vhost,
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "--formatter",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return {
        q["name"]: (int(q["messages_ready"]), int(q["messages_unacknowledged"]))
        for q in json.loads(listing.stdout or "[]")
        if not q["name"].endswith((".DQ", ".XQ"))
        and (int(q["messages_ready"]) or int(q["messages_unacknowledged"]))
    }


def drained(engine: Engine) -> bool:
    return outbox_rows(engine) == 0


def outbox_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return pending_rows(conn)


def history_gaps(engine: Engine) -> list[str]:
    """Sagas whose history seq is not 1..n with no gap and no repeat."""
    with engine.connect() as conn:
        return orchestrator_store.history_gaps(conn)


def terminate_backends(url: str) -> int:
    """pg_terminate_backend on every connection to ``url``'s database; how many."""
    return faults.terminate_backends(servers.PG_ADMIN_URL, url.rsplit("/", 1)[1])


def amqp_blocked(target: str) -> contextlib.AbstractContextManager[None]:
    """Packets to RabbitMQ's port on loopback are dropped (or refused) while inside."""
    return faults.port_blocked(servers.AMQP_PORT, target)


restart_postgres = faults.restart_postgres
iptables_available = faults.iptables_available
