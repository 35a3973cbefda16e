"""Prometheus metrics scraped from the real processes during a run: the numbers they
serve match what the databases say.

``running_system`` (a small demo: relay, orchestrator and the payment service as real
processes, started by sagabox.supervisor) is shared with test_trace and
test_redaction_e2e.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from orchestrator import Orchestrator
from orchestrator.store import make_engine
from participants.examples import payment
from participants.examples.sagas import registry
from sagabox.supervisor import ProcessSpec, Supervisor, sagabox_argv
from tests import servers

pytestmark = pytest.mark.integration

PROCESSES = ("relay", "orchestrator", "payment")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class System:
    """The processes of a small demo and what a test needs to look at them."""

    supervisor: Supervisor
    log_dir: Path
    file_log_dir: Path
    urls: Mapping[str, str]
    engines: Mapping[str, Engine]
    amqp_url: str
    ports: Mapping[str, int]
    orchestrator: Orchestrator

    def start(self, name: str, data: Mapping[str, Any], version: int | None = None) -> str:
        return self.orchestrator.start(name, data, version=version)

    def wait_settled(self, ids: list[str], timeout: float = 40) -> dict[str, str]:
        def statuses() -> dict[str, str]:
            with self.engines["orchestrator"].connect() as conn:
                rows = conn.execute(
                    text("SELECT id::text, status FROM sagabox.saga WHERE id::text = ANY(:ids)"),
                    {"ids": ids},
                ).all()
            return {r[0]: r[1] for r in rows}

        found: dict[str, str] = {}

        def settled() -> bool:
            nonlocal found
            dead = self.supervisor.dead()
            assert not dead, f"processes died: {dead}; logs in {self.log_dir}"
            found = statuses()
            return all(s not in ("running", "compensating") for s in found.values())

        wait_until(settled, timeout, "the sagas to settle")
        return found

    def scrape(self, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample the process serves: (name, sorted labels) -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[name]}/metrics", timeout=5) as r:
            body = r.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }

    def scalar(self, database: str, sql: str) -> Any:
        with self.engines[database].connect() as conn:
            return conn.execute(text(sql)).scalar()


def total(
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


@contextmanager
def running_system(
    template_db: str, amqp_url: str, tmp_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[System]:
    """Orchestrator and payment databases, the three processes, metrics on free ports."""
    with (
        servers.database_from(template_db) as orchestrator_url,
        servers.database_from(template_db) as payment_url,
    ):
        urls = {"orchestrator": orchestrator_url, "payment": payment_url}
        engines = {name: make_engine(url, pool_size=2) for name, url in urls.items()}
        with Session(engines["payment"]) as session, session.begin():
            payment.open_account(session, "dave", 1_000_000)
        log_dir, file_log_dir = tmp_path / "stdout", tmp_path / "files"
        ports = {name: free_port() for name in PROCESSES}
        common = {
            "SAGABOX_AMQP_URL": amqp_url,
            "SAGABOX_LOG_LEVEL": "INFO",
            "SAGABOX_METRICS_INTERVAL": "0.3",
            **(env or {}),
        }
        specs = [
            ProcessSpec(
                "relay",
                sagabox_argv("relay", "--metrics-port", str(ports["relay"])),
                {"SAGABOX_RELAY_DATABASE_URLS": f"{orchestrator_url},{payment_url}"},
            ),
            ProcessSpec(
                "orchestrator",
                sagabox_argv("orchestrator", "--log-file", str(file_log_dir / "orchestrator.log")),
                {
                    "SAGABOX_DATABASE_URL": orchestrator_url,
                    "SAGABOX_METRICS_PORT": str(ports["orchestrator"]),
                },
            ),
            ProcessSpec(
                "payment",
                sagabox_argv(
                    "participant",
                    "participants.examples.payment",
                    "--threads",
                    "2",
                    "--metrics-port",
                    str(ports["payment"]),
                ),
                {
                    "SAGABOX_PARTICIPANT_DATABASE_URL": payment_url,
                    "SAGABOX_LOG_FILE": str(file_log_dir / "payment.log"),
                },
            ),
        ]
        supervisor = Supervisor(log_dir)
        try:
            for spec in specs:
                supervisor.start(
                    ProcessSpec(
                        spec.name,
                        spec.argv,
                        {
                            **common,
                            # The relay's file log comes from the variable, the others'
                            # from --log-file or their own variable: both paths are used.
                            "SAGABOX_LOG_FILE": str(file_log_dir / f"{spec.name}.log"),
                            **spec.env,
                        },
                    )
                )
            orchestrator = Orchestrator(engines["orchestrator"], registry())
            system = System(
                supervisor, log_dir, file_log_dir, urls, engines, amqp_url, ports, orchestrator
            )
            for name in PROCESSES:
                wait_until(partial(_serving, system, name), 30, f"{name}'s metrics endpoint")
            yield system
        finally:
            supervisor.stop_all()
            for engine in engines.values():
                engine.dispose()


def _serving(system: System, name: str) -> bool:
    dead = system.supervisor.dead()
    assert not dead, f"processes died: {dead}; logs in {system.log_dir}"
    try:
        system.scrape(name)
    except OSError:
        return False
    return True


def test_metrics_match_the_databases(template_db: str, amqp_url: str, tmp_path: Path) -> None:
    with running_system(template_db, amqp_url, tmp_path) as system:
        ids = [
            *(
                system.start(
                    "authorize_payment",
                    {"customer": "dave", "amount": 100 + i, "card": "tok_visa"},
                    version=1,
                )
                for i in range(3)
            ),
            system.start(
                "authorize_payment",
                {"customer": "dave", "amount": 50_000, "card": "tok_visa"},
                version=1,
            ),
        ]
        statuses = system.wait_settled(ids)
        assert sorted(statuses.values()) == ["compensated", "completed", "completed", "completed"]

        def orchestrator_caught_up() -> bool:
            samples = system.scrape("orchestrator")
            return (
                total(samples, "sagabox_sagas", status="completed") == 3
                and total(samples, "sagabox_relay_outbox_backlog") == 0
            )

        wait_until(orchestrator_caught_up, 10, "the saga gauges to refresh")

        def relay_drained() -> bool:
            samples = system.scrape("relay")
            return (
                total(samples, "sagabox_relay_outbox_backlog") == 0
                and total(samples, "sagabox_relay_published_total") > 0
            )

        wait_until(relay_drained, 10, "the relay's backlog gauge to reach 0")
        relay, orch, pay = (system.scrape(n) for n in PROCESSES)

        # Orchestrator: saga gauges per status, read from the database.
        for status in ("completed", "compensated", "running", "failed"):
            in_db = system.scalar(
                "orchestrator", f"SELECT count(*) FROM sagabox.saga WHERE status = '{status}'"
            )
            assert (
                total(orch, "sagabox_sagas", saga="authorize_payment", version="1", status=status)
                == in_db
            )
        assert total(orch, "sagabox_sagas_long_running") == 0
        # Every reply applied wrote one history row caused by a message.
        applied = system.scalar(
            "orchestrator", "SELECT count(*) FROM sagabox.saga_history WHERE message_id IS NOT NULL"
        )
        assert total(orch, "sagabox_orchestrator_replies_total", outcome="applied") == applied > 0
        assert total(orch, "sagabox_orchestrator_batch_size_count") >= 1
        assert total(orch, "sagabox_orchestrator_batch_seconds_count") >= 1
        assert total(orch, "sagabox_orchestrator_replies_dead_lettered_total") == 0

        # Participant: commands handled == inbox rows; one handler timing per handled message.
        for kind in ("command", "compensation"):
            rows = system.scalar(
                "payment",
                "SELECT count(*) FROM sagabox.command_inbox"
                f" WHERE action = '{kind}' AND status = 'done'",
            )
            assert (
                total(pay, "sagabox_participant_handled_total", participant="payment", kind=kind)
                == rows
            )
        handled = total(pay, "sagabox_participant_handled_total")
        assert handled == total(pay, "sagabox_participant_handler_seconds_count")
        refused = total(
            pay, "sagabox_participant_handled_total", type="check_risk", outcome="failed"
        )
        assert refused == 1
        assert total(pay, "sagabox_participant_inbox_duplicates_total") == 0
        assert total(pay, "sagabox_participant_dead_lettered_total") == 0

        # Every command the orchestrator emitted and every reply was published once: by
        # the orchestrator and payment's worker themselves (direct publishing), or by
        # the relay (the starts' commands, a row behind an earlier one of its saga).
        emitted = system.scalar(
            "orchestrator",
            "SELECT coalesce(sum(jsonb_array_length(emitted)), 0) FROM sagabox.saga_history"
            " WHERE jsonb_typeof(emitted) = 'array'",
        )
        published = total(relay, "sagabox_relay_published_total")
        commands = total(orch, "sagabox_orchestrator_direct_published_total", outcome="confirmed")
        replies = total(pay, "sagabox_participant_direct_published_total", outcome="confirmed")
        assert published + commands + replies == emitted + handled
        assert published >= len(statuses) and commands >= 1 and replies >= 1
        for scraped, name in (
            (orch, "sagabox_orchestrator_direct_published_total"),
            (pay, "sagabox_participant_direct_published_total"),
        ):
            assert total(scraped, name, outcome="refused") == 0
        assert total(relay, "sagabox_relay_confirm_seconds_count") >= 1
        assert total(relay, "sagabox_relay_outbox_parked") == 0
        assert total(relay, "sagabox_relay_parked_total") == 0
        # The only relay leads both databases it serves (the orchestrator's, payment's).
        assert total(relay, "sagabox_relay_leading") == 2
