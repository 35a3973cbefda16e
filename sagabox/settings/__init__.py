"""Typed settings, one frozen object per process, read from environment variables.

Each process builds its settings once at its entry point (``XSettings.from_env()``)
and passes them down; no library module reads the environment. Secrets may come
from a file named by ``NAME_FILE`` instead of ``NAME``. Every bad value raises
ConfigurationError naming the variable.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

from outbox_relay.errors import ConfigurationError

PREFIX = "SAGABOX_"


class Env:
    """Reads ``SAGABOX_*`` variables from a mapping (os.environ by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ

    def raw(self, name: builtins.str) -> builtins.str | None:
        key = PREFIX + name
        if key in self.environ:
            return self.environ[key]
        file_key = key + "_FILE"
        if file_key in self.environ:
            path = Path(self.environ[file_key])
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ConfigurationError(f"{file_key}: cannot read {path}: {e.strerror}") from e
        return None

    def str(self, name: builtins.str, default: builtins.str | None = None) -> builtins.str:
        value = self.raw(name)
        if value is None or value == "":
            if default is None:
                raise ConfigurationError(f"{PREFIX}{name} is required")
            return default
        return value

    def int(self, name: builtins.str, default: int, *, minimum: int = 0) -> int:
        value = self.raw(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigurationError(f"{PREFIX}{name} must be an integer, got {value!r}") from None
        if number < minimum:
            raise ConfigurationError(f"{PREFIX}{name} must be >= {minimum}, got {number}")
        return number

    def float(self, name: builtins.str, default: float, *, minimum: float = 0.0) -> float:
        value = self.raw(name)
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigurationError(f"{PREFIX}{name} must be a number, got {value!r}") from None
        if number < minimum:
            raise ConfigurationError(f"{PREFIX}{name} must be >= {minimum}, got {number}")
        return number

    def bool(self, name: builtins.str, default: bool) -> bool:
        value = self.raw(name)
        if value is None or value == "":
            return default
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigurationError(f"{PREFIX}{name} must be true or false, got {value!r}")

    def choice(
        self, name: builtins.str, default: builtins.str, choices: tuple[builtins.str, ...]
    ) -> builtins.str:
        value = self.str(name, default).strip().lower()
        if value not in choices:
            raise ConfigurationError(
                f"{PREFIX}{name} must be one of {', '.join(choices)}, got {value!r}"
            )
        return value

    def list(
        self, name: builtins.str, default: builtins.list[builtins.str] | None = None
    ) -> builtins.list[builtins.str]:
        value = self.raw(name)
        if value is None or value.strip() == "":
            if default is None:
                raise ConfigurationError(f"{PREFIX}{name} is required")
            return default
        return [item.strip() for item in value.split(",") if item.strip()]


# libpq's sslmode values (https://www.postgresql.org/docs/current/libpq-ssl.html).
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def database_url(value: str, variable: str) -> str:
    """Normalise a PostgreSQL URL for SQLAlchemy's psycopg 3 driver, or say what is wrong.

    Query parameters (``sslmode``, ``sslrootcert``, ...) pass through to libpq; an
    ``sslmode`` libpq does not know is refused here rather than at the first connect.
    Errors name ``variable`` and never repeat the URL (it may hold a password).
    """
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if value.startswith(prefix):
            url = "postgresql+psycopg://" + value.removeprefix(prefix)
            _check_url(url, variable)
            for mode in parse_qs(urlsplit(url).query).get("sslmode", []):
                if mode not in SSLMODES:
                    raise ConfigurationError(
                        f"{variable}: unknown sslmode {mode!r}; use one of {', '.join(SSLMODES)}"
                    )
            return url
    raise ConfigurationError(f"{variable} must be a postgresql:// URL")


def libpq_url(value: str) -> str:
    """The same URL in the form psycopg.connect() takes."""
    return "postgresql://" + value.split("://", 1)[1]


def amqp_url(value: str, variable: str) -> str:
    """Check a RabbitMQ URL: ``amqp://`` or ``amqps://`` (TLS, port 5671 by default)."""
    if not value.startswith(("amqp://", "amqps://")):
        raise ConfigurationError(f"{variable} must be an amqp:// or amqps:// URL")
    _check_url(value, variable)
    return value


def _check_url(value: str, variable: str) -> None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ConfigurationError(
            f"{variable} is not a valid URL (host or port): {mask_url(value)}"
        ) from None


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: safe to print or log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sagabox"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
