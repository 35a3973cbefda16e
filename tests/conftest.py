from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import servers


@pytest.fixture(scope="session")
def services() -> None:
    """PostgreSQL and RabbitMQ are up (started if a test or a run left them down)."""
    if not (servers.pg_reachable() and servers.amqp_reachable()):
        servers.ensure_services()


@pytest.fixture(scope="session")
def template_db(services: None) -> Iterator[str]:
    name = servers.create_template()
    yield name
    servers.drop_database(name)


@pytest.fixture
def db_url(template_db: str) -> Iterator[str]:
    """A fresh database, migrated to head, for this test alone."""
    with servers.database_from(template_db) as url:
        yield url


@pytest.fixture(scope="session")
def vhost_pool(services: None) -> Iterator[servers.VhostPool]:
    pool = servers.VhostPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def session_vhost(vhost_pool: servers.VhostPool) -> Iterator[str]:
    with servers.vhost(vhost_pool) as url:
        yield url


@pytest.fixture
def amqp_url(vhost_pool: servers.VhostPool) -> Iterator[str]:
    """A fresh RabbitMQ vhost for this test alone (guest has full rights on it)."""
    with servers.vhost(vhost_pool) as url:
        yield url
