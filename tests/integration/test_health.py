"""``--check`` of the orchestrator, a participant and the relay: exit 0 when the database
is reachable and at the schema head of the process's branches and RabbitMQ answers,
else 1 with one line per problem."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import migrations
from sagabox.cli import main
from tests import servers

pytestmark = pytest.mark.integration

PARTICIPANT = ["participant", "participants.examples.payment", "--check"]


@contextmanager
def database(*branches: str, revision: str = "head") -> Iterator[str]:
    """A new database migrated to ``branches`` only (none: empty)."""
    name = f"sagabox_test_health_{uuid.uuid4().hex[:10]}"
    servers.admin(f'CREATE DATABASE "{name}"')
    url = servers.database_url(name)
    try:
        for branch in branches:
            migrations.upgrade(url, branch, revision)
        yield url
    finally:
        servers.drop_database(name)


def check(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    db: str,
    amqp: str,
) -> tuple[int, str, str]:
    for variable in ("DATABASE_URL", "PARTICIPANT_DATABASE_URL", "RELAY_DATABASE_URLS"):
        monkeypatch.setenv(f"SAGABOX_{variable}", db)
    monkeypatch.setenv("SAGABOX_AMQP_URL", amqp)
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv", [["orchestrator", "--check"], PARTICIPANT, ["relay", "--check"]], ids=lambda a: a[0]
)
def test_check_passes_on_a_migrated_database_and_a_live_broker(
    argv: list[str],
    db_url: str,
    session_vhost: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = check(monkeypatch, capsys, argv, db_url, session_vhost)
    assert (code, err) == (0, "")
    assert "ok" in out or "reachable" in out


@pytest.mark.parametrize("argv", [["orchestrator", "--check"], PARTICIPANT], ids=lambda a: a[0])
def test_check_names_each_problem_on_its_own_line(
    argv: list[str],
    session_vhost: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    missing = servers.database_url(f"no_such_db_{uuid.uuid4().hex[:6]}")
    dead_broker = session_vhost.replace(":5672", ":1")
    code, _, err = check(monkeypatch, capsys, argv, missing, dead_broker)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 2, err
    assert "no_such_db" in lines[0] and "unreachable" in lines[0]
    assert "rabbitmq" in lines[1] and "guest" not in lines[1]  # no credentials printed


def test_check_reports_a_schema_behind_its_head(
    session_vhost: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with database() as empty:
        code, _, err = check(monkeypatch, capsys, ["orchestrator", "--check"], empty, session_vhost)
        assert code == 1 and "not migrated" in err
    with database("participant") as participant_only:
        code, _, err = check(monkeypatch, capsys, PARTICIPANT, participant_only, session_vhost)
        assert code == 0, err
        argv = ["orchestrator", "--check"]
        code, _, err = check(monkeypatch, capsys, argv, participant_only, session_vhost)
        assert code == 1 and "branch 'orchestrator' is not at its head" in err
    with database("outbox", revision="outbox_0001") as old_outbox:
        code, _, err = check(monkeypatch, capsys, ["relay", "--check"], old_outbox, session_vhost)
        head = migrations.heads()["outbox"]
        assert code == 1 and f"branch 'outbox' is not at its head {head!r}" in err
        assert len(err.strip().splitlines()) == 1
