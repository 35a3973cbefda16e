"""``sagabox demo``: the whole system on this machine, a mix of sagas, a consistency check.

It creates one database for the orchestrator and one per example service, a RabbitMQ
vhost, starts the relay, the orchestrator and one worker per service as real
processes, runs sagas that succeed and sagas that must compensate, prints each
outcome and the business invariants read from the services' own databases, then
stops everything it started. Exit status 0 only when every check holds.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Engine, select

import migrations
from orchestrator import Orchestrator
from orchestrator.store import make_engine
from orchestrator.tables import saga as saga_table
from outbox_relay import vhosts
from participants.examples import SERVICES
from participants.examples.checks import SagaOutcome, Seed, check, seed
from participants.examples.sagas import registry
from sagabox.supervisor import Supervisor
from sagabox.up import UpConfig, specs

SEED = Seed(
    stock={"apple": 100, "pear": 20},
    balances={"alice": 100_000, "bob": 50, "carol": 20_000, "dave": 100_000, "erin": 10_000},
)


@dataclass(frozen=True)
class Order:
    """One saga the demo starts and the outcome it expects."""

    name: str
    data: Mapping[str, Any]
    expect: str
    why: str
    version: int | None = None


def _order(customer: str, sku: str, qty: int, amount: int, country: str = "FR") -> dict[str, Any]:
    return {
        "order_id": f"order-{uuid.uuid4().hex[:8]}",
        "customer": customer,
        "sku": sku,
        "qty": qty,
        "amount": amount,
        "country": country,
        "email": f"{customer}@example.com",
    }


def scenario() -> list[Order]:
    return [
        *[
            Order(
                "place_order", _order("alice", "apple", 2, 300), "completed", "stock and funds", 1
            )
            for _ in range(5)
        ],
        Order(
            "place_order",
            _order("bob", "apple", 1, 900),
            "compensated",
            "payment declined: stock released",
            1,
        ),
        Order(
            "place_order",
            _order("alice", "pear", 1, 200, "US"),
            "compensated",
            "no shipping to US: refunded, stock released",
            1,
        ),
        Order(
            "place_order",
            _order("alice", "pear", 500, 200),
            "compensated",
            "out of stock: nothing to undo",
            1,
        ),
        *[
            Order(
                "place_order",
                _order("carol", "pear", 1, 150),
                "completed",
                "v2: ship and points in parallel, then email",
                2,
            )
            for _ in range(3)
        ],
        Order(
            "place_order",
            _order("bob", "pear", 1, 5_000),
            "compensated",
            "v2: payment declined",
            2,
        ),
        *[
            Order(
                "place_order",
                _order("erin", "apple", 1, 120),
                "completed",
                "v3: v1 on a routing slip, services pass it on",
                3,
            )
            for _ in range(2)
        ],
        Order(
            "place_order",
            _order("bob", "apple", 1, 4_000),
            "compensated",
            "v3: payment declined down the slip",
            3,
        ),
        Order(
            "collect_fare",
            {"passenger": "dave", "amount": 700, "account": "acct-dave"},
            "completed",
            "registered, pre-authorised, captured, booked",
        ),
        Order(
            "collect_fare",
            {"passenger": "bob", "amount": 900, "account": "acct-bob"},
            "compensated",
            "pre-authorisation declined: fare voided",
        ),
        Order(
            "authorize_payment",
            {"customer": "dave", "amount": 1_200, "card": "tok_visa"},
            "completed",
            "authorised, checked, settled",
            1,
        ),
        Order(
            "authorize_payment",
            {"customer": "dave", "amount": 50_000, "card": "tok_visa"},
            "compensated",
            "risk check refused: authorisation voided",
            1,
        ),
        Order(
            "authorize_payment",
            {"customer": "dave", "amount": 100, "card": "4111111111111111"},
            "compensated",
            "raw card number: PCI check refused",
            1,
        ),
        Order(
            "authorize_payment",
            {"customer": "dave", "amount": 1_500, "card": "tok_visa"},
            "completed",
            "v2: authorise, risk, PCI in one payment transaction, then settle",
            2,
        ),
        Order(
            "authorize_payment",
            {"customer": "dave", "amount": 60_000, "card": "tok_visa"},
            "compensated",
            "v2: risk refused inside that transaction: authorisation voided",
            2,
        ),
    ]


@dataclass
class Demo:
    admin_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    amqp_host: str = "127.0.0.1:5672"
    prefix: str = "sagabox_demo"
    timeout: float = 120.0
    say: Callable[[str], None] = print
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sagabox-demo-")))

    def database_url(self, name: str) -> str:
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{self.prefix}_{name}"

    def run(self) -> int:
        self.say(f"sagabox demo: logs in {self.log_dir}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        urls = {name: self.database_url(name) for name in ("orchestrator", *SERVICES)}
        for name, url in urls.items():
            self._recreate_database(url)
            branches = (
                ["orchestrator"] if name == "orchestrator" else ["participant", f"example_{name}"]
            )
            for branch in branches:
                migrations.upgrade(url, branch)
        self.say(f"databases: {', '.join(u.rpartition('/')[2] for u in urls.values())}")
        amqp_url = self._recreate_vhost()
        engines = {name: make_engine(url, pool_size=2) for name, url in urls.items()}
        try:
            seed(engines, SEED)
            with Supervisor(self.log_dir) as supervisor:
                self._start_processes(supervisor, urls, amqp_url)
                return self._run_sagas(supervisor, engines)
        finally:
            for engine in engines.values():
                engine.dispose()
            self.say(f"logs of every process: {self.log_dir}")

    def _start_processes(
        self, supervisor: Supervisor, urls: Mapping[str, str], amqp_url: str
    ) -> None:
        config = UpConfig(
            orchestrator_url=urls["orchestrator"],
            participant_urls={service: urls[service] for service in SERVICES},
            amqp_url=amqp_url,
            sagas="participants.examples.sagas:registry",
            env={"SAGABOX_LOG_LEVEL": "INFO"},
        )
        for spec in specs(config):
            supervisor.start(spec)
        self.say(
            f"started {len(supervisor.processes)} processes: {', '.join(supervisor.processes)}"
        )

    def _run_sagas(self, supervisor: Supervisor, engines: Mapping[str, Engine]) -> int:
        orchestrator = Orchestrator(engines["orchestrator"], registry())
        orders = scenario()
        started = {
            orchestrator.start(o.name, o.data, version=o.version, idempotency_key=str(i)): o
            for i, o in enumerate(orders)
        }
        self.say(f"started {len(started)} sagas; waiting for them to settle")
        outcomes = self._wait(supervisor, engines["orchestrator"], set(started))
        self.say("")
        self.say(f"{'saga':<10} {'name':<18} {'v':>2} {'status':<12} {'expected':<12} why")
        failures: list[str] = []
        for saga_id, order in started.items():
            outcome = outcomes[saga_id]
            mark = "ok" if outcome.status == order.expect else "UNEXPECTED"
            if outcome.status != order.expect:
                failures.append(f"saga {saga_id} ({order.why}) ended {outcome.status}")
            self.say(
                f"{saga_id[:8]:<10} {outcome.name:<18} {outcome.version:>2} {outcome.status:<12} "
                f"{order.expect:<12} {order.why}  [{mark}]"
            )
        failures += check(engines, SEED, outcomes)
        dead = supervisor.dead()
        if dead:
            failures.append(f"processes died during the run: {dead}")
        self.say("")
        self.say("consistency check (read from each service's own database):")
        self.say("  stock + reservations conserved; money conserved; no charge without a")
        self.say("  shipment or a refund; points only for completed orders; no effect twice")
        for failure in failures:
            self.say(f"  FAILED: {failure}")
        self.say("  all checks hold" if not failures else f"  {len(failures)} problem(s)")
        return 0 if not failures else 1

    def _wait(
        self, supervisor: Supervisor, engine: Engine, ids: set[str]
    ) -> dict[str, SagaOutcome]:
        deadline = time.monotonic() + self.timeout
        while True:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(
                        saga_table.c.id,
                        saga_table.c.name,
                        saga_table.c.version,
                        saga_table.c.status,
                    ).where(saga_table.c.id.in_(sorted(ids)))
                ).all()
            outcomes = {r.id: SagaOutcome(r.name, r.version, r.status) for r in rows}
            pending = [o for o in outcomes.values() if o.status in ("running", "compensating")]
            if not pending or time.monotonic() > deadline or supervisor.dead():
                return outcomes
            time.sleep(0.2)

    def _recreate_database(self, url: str) -> None:
        name = url.rpartition("/")[2]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop(self) -> None:
        """Remove the databases and the vhost (the demo itself keeps them to look at)."""
        for name in ("orchestrator", *SERVICES):
            db = self.database_url(name).rpartition("/")[2]
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
                )
        vhosts.delete(self.prefix)

    def _recreate_vhost(self) -> str:
        vhosts.recreate(self.prefix)
        return vhosts.url(self.prefix, self.amqp_host)
