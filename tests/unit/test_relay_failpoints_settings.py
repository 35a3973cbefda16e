"""Failpoints and relay settings: parsing and validation, no servers."""

from __future__ import annotations

import pytest

from outbox_relay.errors import ConfigurationError, RelayError
from outbox_relay.failpoints import Failpoints
from sagabox.settings import Env
from sagabox.settings.relay import RelaySettings


def test_unarmed_failpoints_do_nothing() -> None:
    Failpoints.from_env({}).failpoint("relay.after_confirm_before_mark")
    Failpoints.from_env({"SAGABOX_FAILPOINTS": "other=raise"})("relay.after_mark")


def test_failpoint_actions() -> None:
    points = Failpoints.parse("a=raise; b=sleep:0.01, c=exit")
    assert dict(points.actions) == {"a": "raise", "b": "sleep:0.01", "c": "exit"}
    with pytest.raises(RelayError, match="failpoint a"):
        points.failpoint("a")
    points.failpoint("b")


@pytest.mark.parametrize("value", ["a", "a=explode", "=exit", "a=sleep:x", "a=sleep:-1"])
def test_bad_failpoints_are_rejected(value: str) -> None:
    with pytest.raises(ConfigurationError, match="SAGABOX_FAILPOINTS"):
        Failpoints.parse(value)


def test_relay_settings_defaults() -> None:
    settings = RelaySettings.from_env(Env({}))
    assert settings.database_urls == ("postgresql://postgres@127.0.0.1:5432/sagabox",)
    assert settings.amqp_url.startswith("amqp://")
    config = settings.relay_config()
    assert config.batch_size == 500 and not config.topology.quorum


def test_relay_settings_from_env() -> None:
    settings = RelaySettings.from_env(
        Env(
            {
                "SAGABOX_RELAY_DATABASE_URLS": "postgresql+psycopg://u@h/a, postgres://u@h/b",
                "SAGABOX_AMQP_URL": "amqp://x:y@rabbit:5672/v",
                "SAGABOX_RELAY_BATCH_SIZE": "100",
                "SAGABOX_QUORUM_QUEUES": "true",
                "SAGABOX_QUORUM_DELIVERY_LIMIT": "3",
                "SAGABOX_RELAY_ACTIVE_WINDOW": "0.5",
            }
        )
    )
    assert settings.database_urls == ("postgresql://u@h/a", "postgresql://u@h/b")
    config = settings.relay_config()
    assert config.batch_size == 100 and config.active_window == 0.5
    assert config.topology.quorum and config.topology.delivery_limit == 3


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SAGABOX_RELAY_DATABASE_URLS", "mysql://x/y"),
        ("SAGABOX_AMQP_URL", "http://x"),
        ("SAGABOX_RELAY_BATCH_SIZE", "0"),
        ("SAGABOX_QUORUM_QUEUES", "maybe"),
        # Shorter than the writers' 50 ms debounce: rows would wait for the idle poll.
        ("SAGABOX_RELAY_ACTIVE_WINDOW", "0.05"),
    ],
)
def test_bad_relay_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        RelaySettings.from_env(Env({name: value}))


def test_a_seed_replays_the_failpoint_draws() -> None:
    """No servers: ``exit@P`` and friends fire as the seed says, run after run."""

    def fired(seed: int) -> list[bool]:
        points = Failpoints.parse("p=raise@0.3", seed=seed, error=ValueError)
        outcomes = []
        for _ in range(50):
            try:
                points("p")
            except ValueError:
                outcomes.append(True)
            else:
                outcomes.append(False)
        return outcomes

    assert fired(7) == fired(7) != fired(8)
    assert 5 <= sum(fired(7)) <= 25
    with pytest.raises(ConfigurationError, match="SAGABOX_FAILPOINTS"):
        Failpoints.parse("p=exit@1.5")
