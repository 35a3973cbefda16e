"""Engine-level fixtures: a fresh migrated database behind an Orchestrator with a
clock the test moves. A test module with other sagas overrides ``orch``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from orchestrator import Orchestrator, Registry, make_engine
from tests.sagas import ORDER
from tests.support import Clock


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def orch(engine: Engine, clock: Clock) -> Orchestrator:
    return Orchestrator(engine, Registry([ORDER]), clock=clock)
