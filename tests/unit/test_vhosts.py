"""The vhost helper's pure parts; tests/servers.py makes every test's vhost with it, so
the rabbitmqctl calls themselves run in every integration test."""

from __future__ import annotations

import pytest

from outbox_relay import vhosts
from outbox_relay.errors import ConfigurationError


def test_a_vhost_url_quotes_the_name() -> None:
    assert vhosts.url("a/b c", "rabbit:5672") == "amqp://guest:guest@rabbit:5672/a%2Fb%20c"
    assert vhosts.url("v", user="u", password="p") == "amqp://u:p@127.0.0.1:5672/v"


def test_without_rabbitmqctl_the_error_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigurationError, match="rabbitmqctl is not installed"):
        vhosts.recreate("sagabox_no_such_tool")
