"""Settings from SAGABOX_* variables: TLS options pass through, every bad value is one
clear error naming its variable, and no password ever shows in an error or a log."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest

from outbox_relay.errors import ConfigurationError
from sagabox.settings import SSLMODES, Env, amqp_url, database_url, libpq_url, mask_url
from sagabox.settings.orchestrator import OrchestratorSettings
from sagabox.settings.participant import ParticipantSettings
from sagabox.settings.relay import RelaySettings
from sagabox.up import Replicas, UpConfig, specs

SECRET = "hunter2"
PG = f"postgresql://app:{SECRET}@db.example:5432/shop"
TLS_PG = f"{PG}?sslmode=verify-full&sslrootcert=/etc/sagabox/ca.pem"
AMQPS = f"amqps://app:{SECRET}@rabbit.example:5671/%2F"

Builder = Callable[[Env], Any]
BUILDERS: dict[str, Builder] = {
    "orchestrator": OrchestratorSettings.from_env,
    "relay": RelaySettings.from_env,
    "participant": ParticipantSettings.from_env,
}


@pytest.mark.parametrize("mode", SSLMODES)
def test_every_libpq_sslmode_passes_through(mode: str) -> None:
    url = database_url(f"{PG}?sslmode={mode}", "SAGABOX_DATABASE_URL")
    assert url == f"postgresql+psycopg://app:{SECRET}@db.example:5432/shop?sslmode={mode}"
    assert libpq_url(url).endswith(f"?sslmode={mode}")


def test_tls_urls_reach_every_component_unchanged() -> None:
    env = Env(
        {
            "SAGABOX_DATABASE_URL": TLS_PG,
            "SAGABOX_PARTICIPANT_DATABASE_URL": TLS_PG,
            "SAGABOX_RELAY_DATABASE_URLS": f"{TLS_PG},{PG}?sslmode=require",
            "SAGABOX_AMQP_URL": AMQPS,
        }
    )
    orchestrator = OrchestratorSettings.from_env(env)
    assert orchestrator.database_url.endswith(
        "?sslmode=verify-full&sslrootcert=/etc/sagabox/ca.pem"
    )
    assert orchestrator.amqp_url == AMQPS
    assert ParticipantSettings.from_env(env).database_url == orchestrator.database_url
    relay = RelaySettings.from_env(env)
    assert relay.database_urls == (TLS_PG, f"{PG}?sslmode=require")
    assert relay.amqp_url == AMQPS
    # pika turns amqps:// into a TLS connection with certificate checks.
    assert pika.URLParameters(AMQPS).ssl_options is not None


@pytest.mark.parametrize(
    ("variable", "value", "component"),
    [
        ("SAGABOX_DATABASE_URL", f"{PG}?sslmode=required", "orchestrator"),
        ("SAGABOX_DATABASE_URL", f"mysql://app:{SECRET}@db/shop", "orchestrator"),
        ("SAGABOX_DATABASE_URL", f"postgresql://app:{SECRET}@db:54x2/shop", "orchestrator"),
        ("SAGABOX_PARTICIPANT_DATABASE_URL", f"{PG}?sslmode=on", "participant"),
        ("SAGABOX_RELAY_DATABASE_URLS", f"{PG},{PG}?sslmode=strict", "relay"),
        ("SAGABOX_AMQP_URL", f"http://app:{SECRET}@rabbit/", "orchestrator"),
        ("SAGABOX_AMQP_URL", f"amqps://app:{SECRET}@rabbit:port/", "relay"),
        ("SAGABOX_AMQP_URL", f"amqp://app:{SECRET}@rabbit:99999/", "participant"),
        ("SAGABOX_BATCH_SIZE", "0", "orchestrator"),
        ("SAGABOX_TIMER_INTERVAL", "soon", "orchestrator"),
        ("SAGABOX_SAGAS", "myapp.sagas", "orchestrator"),
        ("SAGABOX_REPLY_QUEUE", "bad queue!", "orchestrator"),
        ("SAGABOX_QUORUM_QUEUES", "maybe", "relay"),
        ("SAGABOX_RELAY_BATCH_SIZE", "many", "relay"),
        ("SAGABOX_RELAY_CONFIRM_TIMEOUT", "0", "relay"),
        ("SAGABOX_RELAY_EXCLUSIVE", "sometimes", "relay"),
        ("SAGABOX_RELAY_STANDBY_POLL_INTERVAL", "0", "relay"),
        ("SAGABOX_RELAY_TAKEOVER_AFTER", "1", "relay"),
        ("SAGABOX_PARTICIPANT_THREADS", "0", "participant"),
        ("SAGABOX_PARTICIPANT_WORKER", "fibers", "participant"),
        ("SAGABOX_PARTICIPANT_BATCH_SIZE", "0", "participant"),
        ("SAGABOX_PARTICIPANT_PUBLISH", "eagerly", "participant"),
        ("SAGABOX_PARTICIPANT_PUBLISH_LEASE", "0", "participant"),
        ("SAGABOX_INBOX_RETENTION_SECONDS", "forever", "participant"),
        ("SAGABOX_SAGA_RETENTION_SECONDS", "-1", "orchestrator"),
    ],
)
def test_a_bad_value_is_one_error_naming_its_variable_and_no_secret(
    variable: str, value: str, component: str
) -> None:
    with pytest.raises(ConfigurationError) as error:
        BUILDERS[component](Env({variable: value}))
    message = str(error.value)
    assert variable in message
    assert SECRET not in message
    assert "\n" not in message


def test_relays_lead_one_at_a_time_unless_told_otherwise() -> None:
    assert RelaySettings.from_env(Env({})).relay_config().exclusive
    shared = RelaySettings.from_env(
        Env({"SAGABOX_RELAY_EXCLUSIVE": "false", "SAGABOX_RELAY_STANDBY_POLL_INTERVAL": "0.5"})
    ).relay_config()
    assert not shared.exclusive
    assert shared.standby_poll_interval == 0.5
    assert RelaySettings.from_env(Env({"SAGABOX_RELAY_TAKEOVER_AFTER": "4"})).takeover_after == 4


def test_a_secret_file_is_read_and_an_unreadable_one_is_named(tmp_path: Path) -> None:
    secret = tmp_path / "database-url"
    secret.write_text(TLS_PG + "\n")
    env = Env({"SAGABOX_DATABASE_URL_FILE": str(secret), "SAGABOX_AMQP_URL": AMQPS})
    assert OrchestratorSettings.from_env(env).database_url.endswith(
        "sslmode=verify-full&sslrootcert=/etc/sagabox/ca.pem"
    )
    missing = Env({"SAGABOX_AMQP_URL_FILE": str(tmp_path / "nope")})
    with pytest.raises(ConfigurationError, match="SAGABOX_AMQP_URL_FILE: cannot read"):
        OrchestratorSettings.from_env(missing)


def test_amqp_and_amqps_are_the_broker_schemes() -> None:
    assert amqp_url("amqp://guest:guest@127.0.0.1:5672/%2F", "X") == (
        "amqp://guest:guest@127.0.0.1:5672/%2F"
    )
    assert amqp_url(AMQPS, "X") == AMQPS
    with pytest.raises(ConfigurationError, match="X must be an amqp:// or amqps:// URL"):
        amqp_url("rabbitmq://h/", "X")


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (PG, "postgresql://app:***@db.example:5432/shop"),
        (
            TLS_PG,
            "postgresql://app:***@db.example:5432/shop?sslmode=verify-full&sslrootcert=/etc/sagabox/ca.pem",
        ),
        (AMQPS, "amqps://app:***@rabbit.example:5671/%2F"),
        ("postgresql://app:p%40ss%3Aw@h/db", "postgresql://app:***@h/db"),
        (
            "postgresql://postgres@127.0.0.1:5432/sagabox",
            "postgresql://postgres@127.0.0.1:5432/sagabox",
        ),
        ("amqp://h/", "amqp://h/"),
    ],
)
def test_mask_url_hides_the_password_only(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_sagabox_up_passes_urls_through_the_environment_never_argv() -> None:
    env = Env({"SAGABOX_DATABASE_URL": TLS_PG, "SAGABOX_AMQP_URL": AMQPS})
    for spec in specs(UpConfig.from_env(env, Replicas(2, 2, 2))):
        assert not any(SECRET in arg for arg in spec.argv), spec.argv
        assert any(SECRET in value for value in spec.env.values()), spec.name


def test_finished_sagas_are_kept_unless_a_retention_is_set() -> None:
    assert OrchestratorSettings.from_env(Env({})).saga_retention == 0
    env = Env({"SAGABOX_SAGA_RETENTION_SECONDS": "2592000"})
    assert OrchestratorSettings.from_env(env).saga_retention == 30 * 24 * 3600


def test_the_participant_worker_is_batch_unless_threads_is_chosen() -> None:
    default = ParticipantSettings.from_env(Env({})).worker_config()
    assert (default.worker, default.batch_size) == ("batch", 32)
    chosen = ParticipantSettings.from_env(
        Env({"SAGABOX_PARTICIPANT_WORKER": "Threads", "SAGABOX_PARTICIPANT_BATCH_SIZE": "8"})
    ).worker_config()
    assert (chosen.worker, chosen.batch_size) == ("threads", 8)


def test_the_batch_worker_publishes_its_replies_and_threads_leave_them_to_the_relay() -> None:
    default = ParticipantSettings.from_env(Env({})).worker_config()
    assert (default.publish, default.publish_lease) == ("direct", 10.0)
    threads = ParticipantSettings.from_env(Env({"SAGABOX_PARTICIPANT_WORKER": "threads"}))
    assert threads.worker_config().publish == "relay"
    chosen = ParticipantSettings.from_env(
        Env({"SAGABOX_PARTICIPANT_PUBLISH": "relay", "SAGABOX_PARTICIPANT_PUBLISH_LEASE": "30"})
    ).worker_config()
    assert (chosen.publish, chosen.publish_lease) == ("relay", 30.0)


def test_the_orchestrator_publishes_its_commands_unless_the_relay_is_chosen() -> None:
    default = OrchestratorSettings.from_env(Env({}))
    assert (default.publish, default.publish_lease) == ("direct", 10.0)
    chosen = OrchestratorSettings.from_env(
        Env({"SAGABOX_ORCHESTRATOR_PUBLISH": "Relay", "SAGABOX_ORCHESTRATOR_PUBLISH_LEASE": "3"})
    )
    assert (chosen.publish, chosen.publish_lease) == ("relay", 3.0)
    with pytest.raises(ConfigurationError, match="SAGABOX_ORCHESTRATOR_PUBLISH must be one of"):
        OrchestratorSettings.from_env(Env({"SAGABOX_ORCHESTRATOR_PUBLISH": "eager"}))
    with pytest.raises(ConfigurationError, match="SAGABOX_ORCHESTRATOR_PUBLISH_LEASE"):
        OrchestratorSettings.from_env(Env({"SAGABOX_ORCHESTRATOR_PUBLISH_LEASE": "0"}))


def test_the_orchestrator_notifies_settled_sagas_unless_told_not_to() -> None:
    assert OrchestratorSettings.from_env(Env({})).notify_settled is True
    off = OrchestratorSettings.from_env(Env({"SAGABOX_NOTIFY_SETTLED": "false"}))
    assert off.notify_settled is False
    with pytest.raises(ConfigurationError, match="SAGABOX_NOTIFY_SETTLED"):
        OrchestratorSettings.from_env(Env({"SAGABOX_NOTIFY_SETTLED": "sometimes"}))
