"""RabbitMQ vhosts of their own, for runs that must judge their queues alone.

The demo, the benchmarks, chaos runs and the tests each make a vhost with
``rabbitmqctl`` (which needs to run on the broker's machine, as root or the rabbitmq
user) and drop it afterwards. The product's processes never call this: they are given
an AMQP URL.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import quote

from outbox_relay.errors import ConfigurationError

DEFAULT_HOST = "127.0.0.1:5672"


def rabbitmqctl(
    *args: str, check: bool = True, timeout: float = 60.0, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``rabbitmqctl -q ARGS``; with ``check``, a ConfigurationError unless it succeeded."""
    command = ["rabbitmqctl", "-q", *args]
    try:
        return subprocess.run(
            command, check=check, capture_output=True, text=True, timeout=timeout, input=stdin
        )
    except FileNotFoundError:
        raise ConfigurationError(
            "rabbitmqctl is not installed here: it is needed to make a RabbitMQ vhost"
        ) from None
    except (OSError, subprocess.SubprocessError) as e:
        output = getattr(e, "stderr", None) or ""
        raise ConfigurationError(
            f"rabbitmqctl {' '.join(args)} failed: {e} {output}".strip()
        ) from e


def recreate(name: str, *, user: str = "guest") -> None:
    """An empty vhost ``name`` (dropped first if it exists), with every right for ``user``."""
    delete(name)
    create([name], user=user)


def create(names: Sequence[str], *, user: str = "guest") -> None:
    """New vhosts ``names``, with every right for ``user``, in one ``rabbitmqctl`` call.

    Each call starts an Erlang VM (about a second of CPU): ``import_definitions`` makes
    them all at once, where ``add_vhost`` and ``set_permissions`` took two calls each.
    """
    definitions = {
        "vhosts": [{"name": name} for name in names],
        "permissions": [
            {"user": user, "vhost": name, "configure": ".*", "write": ".*", "read": ".*"}
            for name in names
        ],
    }
    # On stdin: rabbitmqctl reads a file as the rabbitmq user, who may not see ours.
    rabbitmqctl("import_definitions", "--format", "json", stdin=json.dumps(definitions))


def delete(name: str) -> None:
    """Drop vhost ``name`` and everything in it; nothing happens if there is none."""
    rabbitmqctl("delete_vhost", name, check=False)


def url(
    name: str, host: str = DEFAULT_HOST, *, user: str = "guest", password: str = "guest"
) -> str:
    """The AMQP URL of vhost ``name`` (quoted: vhost names may hold '/')."""
    return f"amqp://{user}:{password}@{host}/{quote(name, safe='')}"


@contextmanager
def scratch(prefix: str, host: str = DEFAULT_HOST) -> Iterator[str]:
    """A fresh vhost named ``PREFIX_<random>`` for the block; yields its AMQP URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    create([name])
    try:
        yield url(name, host)
    finally:
        delete(name)
