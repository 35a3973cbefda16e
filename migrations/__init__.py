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
    """Bring ``branch`` of the database at ``url`` to ``revision``.

    The branches it depends on (the outbox under the orchestrator, say) are brought to
    their own heads first: Alembic would only bring them to the revision named in
    ``depends_on``, and later revisions of a shared branch would never be applied.
    """
    cfg = config(url)
    for dependency in dependencies(branch):
        command.upgrade(cfg, f"{dependency}@head")
    command.upgrade(cfg, f"{branch}@{revision}")


def dependencies(branch: str) -> list[str]:
    """The other branches ``branch`` depends on, the deepest first."""
    script = ScriptDirectory.from_config(config("postgresql://unused"))
    order: list[str] = []
    for rev in reversed(list(script.iterate_revisions(f"{branch}@head", "base"))):
        for label in rev.branch_labels or ():
            if label != branch and label not in order:
                order.append(label)
    return order


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
