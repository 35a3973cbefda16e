"""``sagabox db roles`` on real PostgreSQL: each component runs its real statements under
its own role, and what it has no business doing is refused."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

import migrations
from orchestrator import Orchestrator, make_engine
from orchestrator.tables import saga
from outbox_relay.direct import DirectPublisher, Source
from outbox_relay.message import Envelope, decode
from outbox_relay.relay import check
from outbox_relay.table import OutboxWriter, OutgoingMessage
from participants.examples import inventory
from participants.examples.sagas import registry
from sagabox.cli import main
from sagabox.roles import Roles, statements
from tests import servers
from tests.integration.test_relay import (
    make_rows,
    outbox_count,
    relay_config,
    running_relay,
    wait_until,
    write_rows,
)

pytestmark = pytest.mark.integration

# The database of the test holds every branch; the grants name only these, so the
# participant role is the inventory service's and nothing else's.
BRANCHES = ("outbox", "orchestrator", "participant", "example_inventory")
ORDER = {
    "order_id": "o-1",
    "customer": "alice",
    "sku": "apple",
    "qty": 2,
    "amount": 300,
    "country": "FR",
    "email": "alice@example.com",
}


def as_role(url: str, role: str) -> str:
    """``url`` connecting as ``role`` (the server trusts local TCP: no password)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))


def run_sql(url: str, sql: list[str]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in sql:
            conn.execute(statement.encode())


@pytest.fixture
def roles(db_url: str) -> Iterator[Roles]:
    roles = Roles(f"sbx_{uuid.uuid4().hex[:8]}_")
    name = urlsplit(db_url).path.lstrip("/")
    run_sql(db_url, statements(BRANCHES, name, roles))
    try:
        yield roles
    finally:
        for role in roles.all():
            run_sql(db_url, [f'REASSIGN OWNED BY "{role}" TO postgres', f'DROP OWNED BY "{role}"'])
            servers.admin(f'DROP ROLE IF EXISTS "{role}"')


def refused(url: str, sql: str) -> bool:
    """True when PostgreSQL refuses ``sql`` for lack of privilege."""
    try:
        with psycopg.connect(url) as conn:
            conn.execute(sql.encode())
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


def outbox_envelopes(url: str, destination: str) -> list[Envelope]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT body FROM sagabox.outbox WHERE destination = %s ORDER BY id", (destination,)
        ).fetchall()
    return [decode(body) for (body,) in rows]


def test_the_relay_role_drains_an_outbox_and_cannot_read_sagas(
    db_url: str, amqp_url: str, roles: Roles
) -> None:
    relay_url = as_role(db_url, roles.relay)
    write_rows(db_url, make_rows(50))
    config = relay_config([relay_url], amqp_url)
    assert asyncio.run(check(config)) == []
    with running_relay(config):
        wait_until(lambda: outbox_count(db_url) == 0, 20, "the relay role to drain the outbox")
    assert refused(relay_url, "SELECT count(*) FROM sagabox.saga")
    assert refused(relay_url, "SELECT count(*) FROM sagabox.command_inbox")
    assert refused(relay_url, "SELECT count(*) FROM examples.stock")
    assert refused(
        relay_url,
        "INSERT INTO sagabox.outbox (message_id, destination, body)"
        " VALUES (gen_random_uuid(), 'q', '{}')",
    )
    assert refused(relay_url, "CREATE TABLE sagabox.x (id int)")


def test_each_health_check_passes_under_its_role(
    db_url: str,
    amqp_url: str,
    roles: Roles,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SAGABOX_AMQP_URL", amqp_url)
    monkeypatch.setenv("SAGABOX_DATABASE_URL", as_role(db_url, roles.orchestrator))
    monkeypatch.setenv("SAGABOX_RELAY_DATABASE_URLS", as_role(db_url, roles.relay))
    monkeypatch.setenv("SAGABOX_PARTICIPANT_DATABASE_URL", as_role(db_url, roles.participant))
    for argv in (
        ["orchestrator", "--check"],
        ["relay", "--check"],
        ["participant", "participants.examples.inventory", "--check"],
    ):
        assert main(argv) == 0, (argv, capsys.readouterr())
    # The probes read the schema version: without that grant they would fail forever.
    run_sql(db_url, [f'REVOKE SELECT ON sagabox.alembic_version FROM "{roles.relay}"'])
    assert main(["relay", "--check"]) == 1


def test_orchestrator_and_participant_roles_run_a_saga_step_and_stay_in_their_lane(
    db_url: str, roles: Roles
) -> None:
    orchestrator_url = as_role(db_url, roles.orchestrator)
    participant_url = as_role(db_url, roles.participant)
    engines: list[Engine] = []
    try:
        orch_engine = make_engine(orchestrator_url, pool_size=1)
        part_engine = make_engine(participant_url, pool_size=1)
        engines += [orch_engine, part_engine]
        orchestrator = Orchestrator(orch_engine, registry())
        saga_id = orchestrator.start("place_order", ORDER, version=1, idempotency_key="k")
        [command] = outbox_envelopes(db_url, "inventory")
        with Session(part_engine) as session, session.begin():
            inventory.add_stock(session, "apple", 10)
        with Session(part_engine) as session, session.begin():
            reply = inventory.inventory.handle(session, command)
        assert reply.type == "succeeded"
        assert outbox_envelopes(db_url, "sagabox.replies") == [reply]
        orchestrator.handle_replies([reply])
        orchestrator.handle_replies([reply])  # a duplicate: the reply inbox drops it
        assert orchestrator.fire_timers() == 0
        [charge] = outbox_envelopes(db_url, "payment")
        assert (charge.step, charge.correlation_id) == ("charge_payment", saga_id)
        with orch_engine.connect() as conn:
            assert conn.execute(select(saga.c.status).where(saga.c.id == saga_id)).scalar_one() == (
                "running"
            )
    finally:
        for engine in engines:
            engine.dispose()
    assert refused(participant_url, "SELECT count(*) FROM sagabox.saga")
    assert refused(participant_url, "DELETE FROM sagabox.reply_inbox")
    assert refused(participant_url, "SELECT body FROM sagabox.outbox")
    assert refused(participant_url, "SELECT count(*) FROM examples.accounts")  # payment's
    assert refused(orchestrator_url, "SELECT count(*) FROM sagabox.command_inbox")
    assert refused(orchestrator_url, "SELECT body FROM sagabox.outbox")
    assert refused(orchestrator_url, "UPDATE sagabox.outbox SET body = ''")
    assert refused(orchestrator_url, "SELECT count(*) FROM examples.stock")
    assert refused(orchestrator_url, "DROP TABLE sagabox.saga")


def test_the_writers_roles_may_publish_their_own_rows_but_not_read_bodies(
    db_url: str, roles: Roles
) -> None:
    """Direct publishing's statements under the orchestrator's and the participant's
    roles: the leased inserts (one row, several rows, each asking whether a row of the
    saga waits), the delete of a confirmed row, the release of a refused one."""
    for role in (roles.orchestrator, roles.participant):
        url = as_role(db_url, role)
        engine = make_engine(url, pool_size=1)
        writer = OutboxWriter(lease=30.0)
        saga_id = str(uuid.uuid4())
        try:
            for sagas in ([saga_id], [saga_id, str(uuid.uuid4())]):
                messages = [OutgoingMessage(str(uuid.uuid4()), s, "q", "{}") for s in sagas]
                with engine.begin() as conn:
                    built = writer.statement(messages)
                    assert built is not None
                    row = conn.exec_driver_sql(*built).first()
                    writer.direct.took(None if row is None else tuple(row))
                writer.direct.committed()
            # The saga's second row waited behind its first: the relay's, not leased.
            [(confirmed, _), (refused_id, _)] = writer.direct.ready
            writer.direct.confirmed(confirmed)
            writer.direct.refused(refused_id)
            DirectPublisher([Source(role, writer, engine)]).sweep()
            assert not writer.direct.unswept, f"{role} could not sweep"
        finally:
            engine.dispose()
        with psycopg.connect(db_url) as conn:
            left = conn.execute(
                "SELECT correlation_id::text, available_at IS NOT NULL FROM sagabox.outbox "
                "ORDER BY id"
            ).fetchall()
            conn.execute("DELETE FROM sagabox.outbox")
        assert sorted(left) == sorted([(saga_id, False), (str(messages[1].correlation_id), False)])
        assert refused(url, "SELECT body FROM sagabox.outbox")


def test_the_migrator_owns_the_schema_and_may_rerun_the_grants(db_url: str, roles: Roles) -> None:
    migrator_url = as_role(db_url, roles.migrator)
    for branch in BRANCHES:
        migrations.upgrade(migrator_url, branch)  # reads and writes alembic_version
    name = urlsplit(db_url).path.lstrip("/")
    run_sql(migrator_url, statements(BRANCHES, name, roles, grants_only=True))
    run_sql(migrator_url, ["CREATE TABLE sagabox.scratch (id int)", "DROP TABLE sagabox.scratch"])
    with psycopg.connect(db_url) as conn:
        owners = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'sagabox'"
            " AND tablename IN ('saga', 'outbox', 'command_inbox', 'alembic_version')"
        ).fetchall()
    assert owners == [(roles.migrator,)]


def test_the_cli_prints_the_sql_and_applies_it(db_url: str) -> None:
    prefix = f"sbx_{uuid.uuid4().hex[:8]}_"
    base = [sys.executable, "-m", "sagabox", "db", "roles", "--prefix", prefix]
    branches = ["--branch", "orchestrator"]
    env = {"SAGABOX_DATABASE_URL": db_url}
    printed = subprocess.run(
        [*base, *branches], env=env, capture_output=True, text=True, check=False
    )
    assert printed.returncode == 0, printed.stderr
    assert f'GRANT SELECT, UPDATE, DELETE ON "sagabox"."outbox" TO "{prefix}relay"' in (
        printed.stdout
    )
    try:
        applied = subprocess.run(
            [*base, *branches, "--apply"], env=env, capture_output=True, text=True, check=False
        )
        assert applied.returncode == 0, applied.stderr
        assert not refused(as_role(db_url, f"{prefix}orchestrator"), "SELECT 1 FROM sagabox.saga")
    finally:
        for role in Roles(prefix).all():
            run_sql(db_url, [f'REASSIGN OWNED BY "{role}" TO postgres', f'DROP OWNED BY "{role}"'])
            servers.admin(f'DROP ROLE IF EXISTS "{role}"')


def test_a_fresh_database_follows_the_documented_order(services: None) -> None:
    """Admin: roles first; migrator: migrations, then grants; runtime roles then work."""
    name = f"sagabox_test_roles_{uuid.uuid4().hex[:8]}"
    servers.admin(f'CREATE DATABASE "{name}"')
    url = servers.database_url(name)
    roles = Roles(f"sbx_{uuid.uuid4().hex[:8]}_")
    branches = ("participant", "example_inventory")
    try:
        run_sql(url, statements(branches, name, roles))
        migrator_url = as_role(url, roles.migrator)
        for branch in branches:
            migrations.upgrade(migrator_url, branch)
        run_sql(migrator_url, statements(branches, name, roles, grants_only=True))
        participant_url = as_role(url, roles.participant)
        run_sql(participant_url, ["INSERT INTO examples.stock VALUES ('apple', 3)"])
        assert not refused(participant_url, "SELECT * FROM sagabox.command_inbox")
        assert refused(participant_url, "CREATE TABLE examples.mine (id int)")
    finally:
        servers.drop_database(name)
        for role in roles.all():
            servers.admin(f'DROP ROLE IF EXISTS "{role}"')


def test_a_health_check_names_a_table_its_role_may_not_use(
    db_url: str,
    amqp_url: str,
    roles: Roles,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SAGABOX_AMQP_URL", amqp_url)
    # The relay's role runs the orchestrator: it may read the schema version, not the sagas.
    monkeypatch.setenv("SAGABOX_DATABASE_URL", as_role(db_url, roles.relay))
    assert main(["orchestrator", "--check"]) == 1
    err = capsys.readouterr().err
    assert "lacks SELECT, INSERT, UPDATE on sagabox.saga" in err
    assert "lacks INSERT on sagabox.outbox" in err
    run_sql(db_url, [f'REVOKE UPDATE ON sagabox.outbox FROM "{roles.relay}"'])
    monkeypatch.setenv("SAGABOX_RELAY_DATABASE_URLS", as_role(db_url, roles.relay))
    assert main(["relay", "--check"]) == 1
    assert "lacks UPDATE on sagabox.outbox" in capsys.readouterr().err
    # A worker publishing its own replies (the default) deletes them once confirmed.
    run_sql(db_url, [f'REVOKE DELETE ON sagabox.outbox FROM "{roles.participant}"'])
    monkeypatch.setenv("SAGABOX_PARTICIPANT_DATABASE_URL", as_role(db_url, roles.participant))
    participant = ["participant", "participants.examples.inventory", "--check"]
    assert main(participant) == 1
    assert "lacks DELETE on sagabox.outbox" in capsys.readouterr().err
    monkeypatch.setenv("SAGABOX_PARTICIPANT_PUBLISH", "relay")
    assert main(participant) == 0, capsys.readouterr()
