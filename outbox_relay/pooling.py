"""A pooled connection checked before use, without a round trip.

SQLAlchemy's ``pool_pre_ping`` sends an empty query at every checkout: a round trip,
and a transaction of PostgreSQL's, for every start of a saga and every command of a
participant. A server that ends a session (a restart, ``pg_terminate_backend``,
``idle_session_timeout``) first sends the client its reason, and a connection that
sits idle in the pool has nothing else coming to it: its socket turns readable. One
``poll`` with no timeout tells, and the pool replaces the connection, and every one
pooled before it (the server restarted, most likely), before the caller sees an error.
A connection cut silently (a host gone, a firewall's idle timeout) is not seen; a ping
would wait on it as long as the statement does.
"""

from __future__ import annotations

import select
from typing import Any

import psycopg
from sqlalchemy import Engine, event
from sqlalchemy.exc import InvalidatePoolError


def check_on_checkout(engine: Engine) -> None:
    """Make ``engine``'s pool replace connections whose session the server ended."""
    event.listen(engine, "checkout", _refuse_ended)


def _refuse_ended(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    if session_ended(dbapi_connection):
        raise InvalidatePoolError("the server ended this pooled session")


def session_ended(connection: Any) -> bool:
    """Whether an idle psycopg connection was closed, or its server sent it something."""
    if connection.closed:
        return True
    try:
        fd = connection.fileno()
    except psycopg.Error:  # a connection libpq knows to be broken has no socket
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
