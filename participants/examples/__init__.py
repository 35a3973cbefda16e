"""Example participant services, one module per service, each with its own tables.

Their tables live in schema ``examples`` and come from one Alembic branch per
service (``example_<service>``, depending on the ``participant`` branch). Business
rules are kept simple so that consistency is checkable after any run:

- inventory: stock.available + the quantities of active reservations is constant;
- payment: a balance + its active charges and holds is constant;
- loyalty: a customer's points are the sum of their active awards;
- shipping, notification, accounting: one row per applied command, with its state.
"""

from __future__ import annotations

SERVICES = ("inventory", "payment", "shipping", "loyalty", "notification", "accounting")

# The Alembic branch of each example service's tables.
BRANCHES = tuple(f"example_{service}" for service in SERVICES)

SCHEMA = "examples"
