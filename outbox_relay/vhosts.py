"""RabbitMQ vhosts of their own, for runs that must judge their queues alone.

The demo, the benchmarks, chaos runs and the tests each make a vhost with
``rabbitmqctl`` (which needs to run on the broker's machine, as root or the rabbitmq
user) and drop it afterwards. The product's processes never call this: they are given
an AMQP URL.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

from outbox_relay.errors import ConfigurationError

DEFAULT_HOST = "127.0.0.1:5672"


def rabbitmqctl(
    *args: str, check: bool = True, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``rabbitmqctl -q ARGS``; with ``check``, a ConfigurationError unless it succeeded."""
    command = ["rabbitmqctl", "-q", *args]
    try:
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=timeout)
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
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")


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
    recreate(name)
    try:
        yield url(name, host)
    finally:
        delete(name)
