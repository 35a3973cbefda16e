"""The whole order system under faults: processes killed at their failpoints, database
connections terminated, PostgreSQL restarted, RabbitMQ's connections closed, RabbitMQ
stopped and started, blackholed and refused, a
participant paused past its step timeout, a message that kills its worker. After each,
every saga ends as it must, no effect is applied twice, every outbox drains and every
history is contiguous (tests/faults/harness.py)."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pika
import pytest

from orchestrator import Registry, Retry, Saga, Step, data
from outbox_relay.message import Envelope, encode
from participants.examples import sagas
from sagabox.chaos import FAULT_KINDS, Chaos, ChaosConfig
from sagabox.up import Replicas
from tests import servers
from tests.faults import harness
from tests.faults.harness import System, running, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

#: One charge that gives up after 2 s with no reply: the orchestrator then compensates
#: it while the command may still be on its way (cancel-before-do).
quick_charge = Saga(
    "quick_charge",
    version=1,
    input={"customer": str, "amount": int},
    steps=[
        Step(
            "charge_payment",
            participant="payment",
            command="charge_payment",
            compensation="refund_payment",
            payload={"customer": data("customer"), "amount": data("amount")},
            result=("charge_id",),
            retry=Retry(max_attempts=1),
            timeout=2,
        )
    ],
)


#: Stock then quick_charge's charge on a routing slip: inventory forwards the charge
#: itself, and the run's one deadline (1 + 2 s) covers both; past it, both steps are
#: compensated.
quick_slip = Saga(
    "quick_slip",
    version=1,
    input={"sku": str, "customer": str, "amount": int},
    routing_slip=True,
    steps=[
        Step(
            "reserve_stock",
            participant="inventory",
            command="reserve_stock",
            compensation="release_stock",
            payload={"sku": data("sku"), "qty": 1},
            result=("reservation_id",),
            retry=Retry(max_attempts=1),
            timeout=1,
        ),
        *quick_charge.steps,
    ],
)


def registry() -> Registry:
    """The example sagas, quick_charge and quick_slip
    (SAGABOX_SAGAS=tests.faults.test_faults:registry)."""
    return Registry([*sagas.registry(), quick_charge, quick_slip])


SAGAS = "tests.faults.test_faults:registry"


@pytest.fixture
def system(template_db: str, amqp_url: str, tmp_path: Path) -> Iterator[System]:
    with harness.databases(template_db) as urls:
        yield System(urls, amqp_url, tmp_path / "logs", registry(), sagas=SAGAS)


@pytest.mark.parametrize("version", [1, 3], ids=["orchestrated", "routing_slip"])
def test_killed_at_every_failpoint_and_restarted_loses_nothing(
    system: System, version: int
) -> None:
    # In the order a saga reaches them: inventory dies before any reply exists, the
    # orchestrator on the first replies, payment once a charge is committed. On the
    # routing slip (v3) payment's commit holds the shipping command it forwards.
    victims = {
        "inventory-1": "participant.before_commit",
        "orchestrator-1": "orchestrator.after_commit_before_ack",
        "payment-1": "participant.after_commit_before_ack",
    }
    armed = {name: {"SAGABOX_FAILPOINTS": f"{point}=exit"} for name, point in victims.items()}
    with running(system, armed):
        system.load(8, version=version)
        for name in victims:
            wait_for(partial(died, system, name), 30, f"{name} to die at its failpoint")
            system.start_one(name)  # the supervisor's restart, with nothing armed
        system.load(4, version=version)
        system.settle()
    system.assert_consistent()
    # payment died after its commit: the redelivered command found its inbox row.
    payment_log = (system.log_dir / "payment-1.log").read_text()
    assert "inbox_duplicate_skipped" in payment_log
    assert ("slip_forwarded" in payment_log) is (version == 3)


def test_a_participant_publishing_directly_killed_after_its_commit_loses_nothing(
    system: System,
) -> None:
    # The participants publish their replies themselves (docs/relay.md, "Direct
    # publishing"); payment dies after its commit, before its publish: its rows stay
    # leased, and the relay publishes them once the lease (2 s here) ends.
    direct = dataclasses.replace(
        system,
        env={
            **system.env,
            "SAGABOX_PARTICIPANT_PUBLISH": "direct",
            "SAGABOX_PARTICIPANT_PUBLISH_LEASE": "2",
        },
    )
    armed = {"payment-1": {"SAGABOX_FAILPOINTS": "participant.after_commit_before_ack=exit"}}
    with running(direct, armed):
        direct.load(8, version=3)
        wait_for(partial(died, direct, "payment-1"), 30, "payment-1 to die at its failpoint")
        direct.start_one("payment-1")
        direct.load(4, version=3)
        direct.settle()
        # Confirmed rows deleted, and what was written behind a leased row published by
        # the relay (woken by the delete), while they run.
        for name, engine in direct.engines.items():
            wait_for(partial(harness.drained, engine), 15, f"{name}'s outbox to drain")
    direct.assert_consistent()
    for service in ("inventory", "payment", "shipping", "loyalty"):
        log = (direct.log_dir / f"{service}-1.log").read_text()
        assert '"direct": true' in log, f"{service} published nothing itself"
    payment_log = (direct.log_dir / "payment-1.log").read_text()
    assert "inbox_duplicate_skipped" in payment_log
    # What payment had committed and not published, the relay published.
    payment_db = urlsplit(direct.urls["payment"]).path.lstrip("/")
    relayed = [
        line
        for line in (direct.log_dir / "relay-1.log").read_text().splitlines()
        if '"outbox_batch_published"' in line and payment_db in line
    ]
    assert relayed, "the relay published none of payment's rows"


def test_terminated_database_connections_are_reopened(system: System) -> None:
    with running(system):
        system.load(6)
        wait_for(lambda: system.count("completed") >= 1, 30, "a first saga to complete")
        for _ in range(2):
            assert harness.terminate_backends(system.urls["orchestrator"]) > 0
            assert harness.terminate_backends(system.urls["payment"]) > 0
            system.load(3)
            time.sleep(1.0)
        system.settle()
    system.assert_consistent()


def test_postgres_restarted_immediately_mid_run(system: System) -> None:
    with running(system):
        system.load(6)
        wait_for(lambda: system.count("completed") >= 1, 30, "a first saga to complete")
        try:
            harness.restart_postgres()
        finally:
            servers.ensure_services()
        system.load(4)
        system.settle(90)
    system.assert_consistent()


def test_broker_connections_closed_mid_run(system: System) -> None:
    # Every process's connections at once: the orchestrator's consumer, the relay's
    # publisher, the workers' consumers and their unacked deliveries.
    vhost = unquote(urlsplit(system.amqp_url).path.lstrip("/"))
    with running(system):
        system.load(6)
        wait_for(lambda: system.count("completed") >= 1, 30, "a first saga to complete")
        for _ in range(2):
            servers.rabbitmqctl("close_all_connections", "--vhost", vhost, "fault test")
            system.load(3)
            time.sleep(1.0)
        system.settle(90)
    system.assert_consistent()
    reconnected = [
        name
        for name in ("orchestrator-1", "relay-1", "inventory-1")
        if "reconnect" in (system.log_dir / f"{name}.log").read_text()
    ]
    assert reconnected == ["orchestrator-1", "relay-1", "inventory-1"]


def test_rabbitmq_stopped_and_started_mid_run(system: System) -> None:
    with running(system):
        system.load(6)
        wait_for(lambda: system.count("completed") >= 1, 30, "a first saga to complete")
        try:
            servers.rabbitmqctl("stop_app")
            system.load(3, may_time_out=True)  # in the orchestrator's outbox meanwhile
            time.sleep(5)
        finally:
            servers.rabbitmqctl("start_app")
            servers.rabbitmqctl("await_startup")
        system.load(3)
        system.settle(90)
    system.assert_consistent()


@pytest.mark.skipif(not harness.iptables_available(), reason="iptables is not installed/usable")
def test_rabbitmq_blackholed_then_refused(system: System) -> None:
    with running(system):
        system.load(4)
        system.settle(30)
        # 30 s of silence, then 5 s of refusals, is longer than a step's 3 attempts of
        # 10 s: the sagas started meanwhile may time out and compensate, which is right too.
        with harness.amqp_blocked("DROP"):
            system.load(3, may_time_out=True)  # only in the orchestrator's outbox for now
            time.sleep(30)
        with harness.amqp_blocked("REJECT"):
            system.load(3, may_time_out=True)
            time.sleep(5)
        system.load(3)
        system.settle(90)
    system.assert_consistent()


# Two sagas whose charge payment-1 holds: quick_charge's, sent by the orchestrator, and
# quick_slip's, forwarded by inventory down a routing slip (the run's deadline passes
# while payment-1 sleeps, and both of its steps are compensated).
HELD = {
    "orchestrated": ("quick_charge", {"customer": "alice", "amount": 7}, 1),
    "routing_slip": ("quick_slip", {"sku": "apple", "customer": "alice", "amount": 7}, 3),
}


@pytest.mark.parametrize("case", sorted(HELD))
def test_compensation_overtakes_a_command_held_by_a_paused_participant(
    system: System, case: str
) -> None:
    name, data, version = HELD[case]
    # payment-1 takes at most 2 messages (batches of 1, prefetch 2); a second replica
    # started later takes what the paused one has no room for.
    spec = system.specs["payment-1"]
    env = {**spec.env, "SAGABOX_PARTICIPANT_BATCH_SIZE": "1"}
    system.specs["payment-1"] = dataclasses.replace(spec, env=env)
    with running(system):
        system.specs["payment-2"] = dataclasses.replace(spec, name="payment-2")
        system.load(4, version=version)
        system.settle(30)
        os.kill(system.pid("payment-1"), signal.SIGSTOP)
        try:
            held = [system.start_saga(name, data, "compensated", 1) for _ in range(2)]
            time.sleep(1.0)  # both charges reach payment-1 and stay there
            system.start_one("payment-2")
            system.load(4, version=version)  # other orders flow through payment-2 meanwhile
            outcomes = system.outcomes
            wait_for(
                lambda: all(outcomes()[s].status == "compensated" for s in held),
                30,
                "the held charges to be compensated while payment-1 sleeps",
            )
        finally:
            os.kill(system.pid("payment-1"), signal.SIGCONT)
        wait_for(
            lambda: (system.log_dir / "payment-1.log").read_text().count("command_cancelled") >= 2,
            20,
            "payment-1 to refuse the late commands",
        )
        system.settle()
    system.assert_consistent()
    assert "command_tombstoned" in (system.log_dir / "payment-2.log").read_text()
    forwarded = (system.log_dir / "inventory-1.log").read_text().count("slip_forwarded")
    # On the slip the held charges came from inventory, not from the orchestrator.
    assert forwarded >= 2 if case == "routing_slip" else forwarded == 0


def test_a_poison_message_is_dead_lettered_while_other_traffic_flows(
    template_db: str, amqp_url: str, tmp_path: Path
) -> None:
    deliveries = tmp_path / "poison-deliveries"
    deliveries.touch()
    with harness.databases(template_db, ("orchestrator", *harness.SERVICES, "poison")) as urls:
        system = System(
            urls,
            amqp_url,
            tmp_path / "logs",
            registry(),
            sagas=SAGAS,
            # Quorum queues count every delivery, also those to a consumer that died.
            env={
                "SAGABOX_QUORUM_QUEUES": "true",
                "SAGABOX_QUORUM_DELIVERY_LIMIT": "4",
                "POISON_DELIVERIES": str(deliveries),
            },
            modules={"poison": "tests.faults.poison"},
        )
        with running(system):
            system.load(4)
            wait_for(lambda: system.count("completed") >= 1, 30, "a first saga to complete")
            publish_poison(amqp_url)
            restarts, deadline = 0, time.monotonic() + 60
            while queue_depth(amqp_url, "poison.XQ") == 0:
                assert time.monotonic() < deadline, system.logs_tail()
                if system.exited("poison-1") is not None:
                    restarts += 1
                    system.start_one("poison-1")
                    if restarts % 2 == 0:
                        system.load(2)  # traffic keeps flowing while poison-1 dies
                time.sleep(0.2)
            system.settle()
        system.assert_consistent()
    count = len(deliveries.read_text().splitlines())
    assert 1 < count <= 5, f"{count} deliveries"


def test_a_short_chaos_run_passes(services: None, tmp_path: Path) -> None:
    config = ChaosConfig(
        sagas=24,
        duration=8,
        seed=11,
        replicas=Replicas(),
        fault_interval=0.8,
        crash_probability=0.1,
        prefix=f"sagabox_chaos_{uuid.uuid4().hex[:8]}",
    )
    lines: list[str] = []
    chaos = Chaos(config, tmp_path / "logs", say=lines.append)
    try:
        report = chaos.run()
    finally:
        chaos.drop()
    text = "\n".join(lines + report.lines(config))
    assert report.verdict == "PASS", text
    assert report.started == 24 and report.drain_seconds is not None, text
    assert all(report.in_flight[kind] >= 1 for kind in FAULT_KINDS), text


def died(system: System, name: str) -> bool:
    """``name`` exited as ``kill -9`` would have it (the failpoints' exit code)."""
    return system.exited(name) == 137


def publish_poison(amqp_url: str) -> None:
    envelope = Envelope(
        message_id=str(uuid.uuid4()),
        correlation_id=str(uuid.uuid4()),
        causation_id=None,
        saga="poison_pill",
        version=1,
        step="swallow",
        attempt=1,
        kind="command",
        type="swallow",
        reply_to="sagabox.replies",
    )
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "",
            "poison",
            encode(envelope, queue="poison", actor="swallow").encode(),
            pika.BasicProperties(delivery_mode=2, message_id=envelope.message_id),
            mandatory=True,
        )
    finally:
        connection.close()


def queue_depth(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        method = connection.channel().queue_declare(queue, passive=True)
        return int(method.method.message_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0  # not declared yet
    finally:
        if connection.is_open:
            connection.close()
