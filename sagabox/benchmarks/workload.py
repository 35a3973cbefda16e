"""The orders every system runs: ``place_order`` v1 with 10% declined payments.

Declined orders come from customers seeded without funds, so payment fails as a
business failure and the stock reservation is compensated. Stock and funds are large
enough that nothing else fails; load is spread over many customers and skus so that
no single row serialises the run.
"""

from __future__ import annotations

import uuid
from typing import Any

from participants.examples.checks import Seed

SKUS = 16
CUSTOMERS = 64
BROKE = 8  # customers without funds: their orders are declined
AMOUNT = 100
DECLINED_EVERY = 10  # one order in ten


def seed_for(count: int) -> Seed:
    """Enough stock and money for ``count`` orders, and the customers without funds."""
    per_sku = count + 100
    per_customer = (count + 100) * AMOUNT
    balances = {f"c{i:03d}": per_customer for i in range(CUSTOMERS)}
    balances |= {f"broke{i}": 0 for i in range(BROKE)}
    return Seed(stock={f"sku{i:02d}": per_sku for i in range(SKUS)}, balances=balances)


def order(index: int) -> dict[str, Any]:
    """Order ``index``: every tenth one is from a customer without funds."""
    declined = index % DECLINED_EVERY == DECLINED_EVERY - 1
    customer = f"broke{index % BROKE}" if declined else f"c{index % CUSTOMERS:03d}"
    return {
        "order_id": f"order-{uuid.uuid4().hex[:12]}",
        "customer": customer,
        "sku": f"sku{index % SKUS:02d}",
        "qty": 1,
        "amount": AMOUNT,
        "country": "FR",
        "email": f"{customer}@example.com",
    }


def expected(index: int) -> str:
    return "compensated" if index % DECLINED_EVERY == DECLINED_EVERY - 1 else "completed"
