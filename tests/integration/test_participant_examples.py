"""The example services against PostgreSQL: each rule, and its consistency check
after commands, duplicates, compensations and cancel-before-do."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

import migrations
from outbox_relay.message import Envelope
from participants import Participant
from participants.examples import BRANCHES, accounting, inventory, loyalty, notification, shipping
from participants.examples import payment as pay
from participants.testing import command, compensation, retry
from tests import servers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def examples_template(template_db: str) -> Iterator[str]:
    name = f"sagabox_ptpl_{uuid.uuid4().hex[:10]}"
    servers.admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        for branch in BRANCHES:
            migrations.upgrade(servers.database_url(name), branch)
        yield name
    finally:
        servers.drop_database(name)


@pytest.fixture
def engine(examples_template: str) -> Iterator[Engine]:
    with servers.database_from(examples_template) as url:
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        yield engine
        engine.dispose()


def handle(engine: Engine, participant: Participant, envelope: Envelope) -> Envelope:
    with Session(engine) as session, session.begin():
        return participant.handle(session, envelope)


def test_inventory_keeps_available_plus_reserved_constant(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        inventory.add_stock(session, "pear", 5)
    p = inventory.inventory
    a = command("reserve_stock", {"sku": "pear", "qty": 2})
    b = command("reserve_stock", {"sku": "pear", "qty": 3})
    c = command("reserve_stock", {"sku": "pear", "qty": 1})
    assert [handle(engine, p, e).type for e in (a, b, retry(b), c)] == [
        "succeeded",
        "succeeded",
        "succeeded",
        "failed",
    ]
    handle(engine, p, compensation("release_stock", a))
    handle(engine, p, compensation("release_stock", a))
    handle(engine, p, compensation("release_stock", c))
    with Session(engine) as session:
        assert inventory.available(session, "pear") == 2
        assert inventory.available(session, "pear") + inventory.reserved(session, "pear") == 5


def test_concurrent_reservations_never_take_more_than_the_stock(engine: Engine) -> None:
    # The stock is taken and the reservation written in one statement: under contention
    # the UPDATE re-checks the row another transaction changed, and no reservation is
    # written without its stock.
    with Session(engine) as session, session.begin():
        inventory.add_stock(session, "fig", 50)
    p = inventory.inventory

    def reserve(_: int) -> list[str]:
        return [
            handle(engine, p, command("reserve_stock", {"sku": "fig", "qty": 1})).type
            for _ in range(10)
        ]

    with ThreadPoolExecutor(8) as pool:
        replies = [t for types in pool.map(reserve, range(8)) for t in types]
    assert (replies.count("succeeded"), replies.count("failed")) == (50, 30)
    with Session(engine) as session:
        assert (inventory.available(session, "fig"), inventory.reserved(session, "fig")) == (0, 50)


def test_payment_charges_refunds_and_insufficient_funds(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        pay.open_account(session, "ann", 100)
    p = pay.payment
    charge = command("charge_payment", {"customer": "ann", "amount": 60})
    too_much = command("charge_payment", {"customer": "ann", "amount": 50})
    assert handle(engine, p, charge).type == "succeeded"
    assert handle(engine, p, too_much).payload == {"reason": "insufficient funds for ann"}
    with Session(engine) as session:
        assert (pay.balance(session, "ann"), pay.held(session, "ann")) == (40, 60)
    assert handle(engine, p, compensation("refund_payment", charge)).type == "compensated"
    assert handle(engine, p, compensation("refund_payment", too_much)).type == "compensated"
    with Session(engine) as session:
        assert (pay.balance(session, "ann"), pay.held(session, "ann")) == (100, 0)


def test_payment_gateway_flow(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        pay.open_account(session, "bob", 500)
    p = pay.payment
    saga = str(uuid.uuid4())
    risky = handle(engine, p, command("check_risk", {"amount": 50_000}, saga_id=saga, step="r"))
    assert risky.type == "failed"
    assert handle(engine, p, command("check_risk", {"amount": 200}, saga_id=saga)).type == (
        "succeeded"
    )
    pci = command("check_pci_compliance", {"card": "4111111111111111"}, saga_id=saga, step="p")
    assert handle(engine, p, pci).type == "failed"
    ok = command("check_pci_compliance", {"card": "tok_abc"}, saga_id=saga, step="p2")
    assert handle(engine, p, ok).type == "succeeded"
    auth = command("authorize_payment", {"customer": "bob", "amount": 200}, saga_id=saga, step="a")
    authorization = handle(engine, p, auth).payload["result"]["authorization_id"]
    settle = command("settle_payment", {"authorization_id": authorization}, saga_id=saga, step="s")
    assert handle(engine, p, settle).payload == {"result": {"settled": 200}}
    # Settled is final: voiding the authorization now changes nothing.
    assert handle(engine, p, compensation("void_authorization", auth)).type == "compensated"
    with Session(engine) as session:
        assert (pay.balance(session, "bob"), pay.held(session, "bob")) == (300, 200)
    settle_again = command(
        "settle_payment", {"authorization_id": authorization}, saga_id=saga, step="s2"
    )
    assert handle(engine, p, settle_again).type == "failed"
    # An open authorization voided gives the amount back; beyond the balance, none opens.
    other = str(uuid.uuid4())
    held = command("authorize_payment", {"customer": "bob", "amount": 250}, saga_id=other, step="h")
    assert handle(engine, p, held).type == "succeeded"
    too_much = command(
        "authorize_payment", {"customer": "bob", "amount": 51}, saga_id=other, step="t"
    )
    assert handle(engine, p, too_much).payload == {"reason": "insufficient funds for bob"}
    with Session(engine) as session:
        assert (pay.balance(session, "bob"), pay.held(session, "bob")) == (50, 450)
    assert handle(engine, p, compensation("void_authorization", held)).type == "compensated"
    with Session(engine) as session:
        assert (pay.balance(session, "bob"), pay.held(session, "bob")) == (300, 200)


def test_shipping_schedules_and_cancels(engine: Engine) -> None:
    p = shipping.shipping
    ship = command("schedule_shipment", {"order_id": "o1", "country": "fr"})
    assert handle(engine, p, ship).type == "succeeded"
    assert handle(
        engine, p, command("schedule_shipment", {"order_id": "o2", "country": "US"})
    ).type == ("failed")
    handle(engine, p, compensation("cancel_shipment", ship))
    with engine.connect() as conn:
        statuses = conn.execute(select(shipping.shipments.c.status)).scalars().all()
    assert statuses == ["cancelled"]


def test_loyalty_points_are_the_sum_of_active_awards(engine: Engine) -> None:
    p = loyalty.loyalty
    a = command("award_points", {"customer": "cy", "points": 10})
    b = command("award_points", {"customer": "cy", "points": 5})
    for envelope in (a, b, a, retry(b)):
        handle(engine, p, envelope)
    handle(engine, p, compensation("revoke_points", a))
    with Session(engine) as session:
        assert loyalty.balance(session, "cy") == 5


def test_notification_cancellation_is_a_second_email(engine: Engine) -> None:
    p = notification.notification
    sent = command("send_order_confirmation", {"order_id": "o1", "email": "d@example.org"})
    assert handle(engine, p, sent).type == "succeeded"
    assert handle(engine, p, compensation("send_order_cancellation", sent, order_id="o1")).type == (
        "compensated"
    )
    never = command("send_order_confirmation", {"order_id": "o2", "email": "e@example.org"})
    handle(engine, p, compensation("send_order_cancellation", never, order_id="o2"))
    assert handle(engine, p, never).type == "cancelled"
    bad = command("send_order_confirmation", {"order_id": "o3", "email": "nobody"})
    assert handle(engine, p, bad).type == "failed"
    with engine.connect() as conn:
        rows = conn.execute(
            select(notification.emails.c.template, notification.emails.c.recipient).order_by(
                notification.emails.c.id
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("order_confirmation", "d@example.org"),
        ("order_cancellation", "d@example.org"),
    ]


def test_accounting_fares_and_entries(engine: Engine) -> None:
    p = accounting.accounting
    fare = command("register_fare", {"passenger": "eve", "amount": 120})
    assert handle(engine, p, fare).type == "succeeded"
    entry = command("record_fare_in_account", {"account": "sales", "amount": 120})
    assert handle(engine, p, entry).type == "succeeded"
    assert handle(engine, p, retry(entry)).type == "succeeded"
    assert handle(engine, p, command("record_fare_in_account", {"amount": 1})).type == "failed"
    handle(engine, p, compensation("void_fare", fare))
    with engine.connect() as conn:
        assert conn.execute(select(accounting.fares.c.status)).scalars().all() == ["voided"]
        assert conn.execute(select(accounting.account_entries.c.amount)).scalars().all() == [120]


@pytest.mark.parametrize(
    "participant",
    [
        inventory.inventory,
        pay.payment,
        shipping.shipping,
        loyalty.loyalty,
        notification.notification,
        accounting.accounting,
    ],
)
def test_every_example_is_consistent(participant: Participant) -> None:
    participant.validate()
    assert participant.name in {
        "inventory",
        "payment",
        "shipping",
        "loyalty",
        "notification",
        "accounting",
    }
