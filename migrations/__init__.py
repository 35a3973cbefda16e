"""Alembic migrations for every database sagabox uses.

Branches (one ``alembic_version`` row each, kept in schema ``sagabox`` so a user's own
Alembic history in the same database is left alone):

- ``outbox``: the outbox table; every database a relay serves has it.
- ``orchestrator``: saga state, history and reply inbox (depends on ``outbox``).
- ``participant``: a participant's command inbox (depends on ``outbox``).
- ``example_<service>``: the business tables of each example service (schema ``examples``).

Several branches may share one database (an order service that is both the saga's
caller and a participant), since they depend on, never copy, the outbox branch.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

HERE = Path(__file__).resolve().parent


def config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    # Alembic's ini interpolation treats '%' specially (URL-encoded passwords).
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, branch: str = "orchestrator", revision: str = "head") -> None:
    """Bring ``branch`` of the database at ``url`` to ``revision``."""
    command.upgrade(config(url), f"{branch}@{revision}")


def heads() -> dict[str, str]:
    """The newest revision of every branch, by branch label."""
    script = ScriptDirectory.from_config(config("postgresql://unused"))
    labels = sorted(
        {label for rev in script.walk_revisions() for label in (rev.branch_labels or ())}
    )
    result: dict[str, str] = {}
    for label in labels:
        head = script.get_revision(f"{label}@head")
        if head is not None:
            result[label] = head.revision
    return result
