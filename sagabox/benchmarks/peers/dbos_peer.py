"""``place_order`` on DBOS Transact: a durable workflow, each step a datasource transaction.

Configuration (DBOS's best honest one for this work, as its docs describe it): the
workflow runs in this process, started synchronously by each driver thread; every
step is an ``SQLAlchemyDatasource.transaction`` on the application database, so its
business writes and DBOS's checkpoint of its output commit together (exactly once);
READ COMMITTED, as the handlers' conditional updates need nothing stronger (DBOS's
default SERIALIZABLE only adds retries on the hot stock and account rows). The system
database (workflow status, inputs, outputs) is a separate PostgreSQL database.
Compensation is try/except in the workflow, in reverse order.

Run by sagabox/benchmarks/run.py as ``python -m sagabox.benchmarks.peers.dbos_peer``.
"""

from __future__ import annotations

import os
import sys
import uuid
from importlib.metadata import version
from typing import Any

from dbos import DBOS, DBOSConfig, SetWorkflowID, SQLAlchemyDatasource

from orchestrator.store import make_engine
from sagabox.benchmarks import store, workload
from sagabox.benchmarks.drive import SAGA_TIMEOUT
from sagabox.benchmarks.peers import business, harness

Results = dict[str, dict[str, Any]]

# Seconds a saga may wait for a pooled connection (SQLAlchemy's default: 30). In an open
# loop faster than DBOS, arrivals queue for the pools longer than that, and a timeout
# there ended the whole run instead of showing DBOS falling behind.
POOL_TIMEOUT = SAGA_TIMEOUT


class DbosPeer:
    name = "dbos"

    def __init__(self, app_url: str, sys_url: str, concurrency: int) -> None:
        pool = max(4, 2 * concurrency)
        config: DBOSConfig = {
            "name": "sagabox-bench",
            "system_database_url": sys_url,
            "sys_db_pool_size": pool,
            "db_engine_kwargs": {"pool_timeout": POOL_TIMEOUT},
            "log_level": "WARNING",
        }
        DBOS(config=config)
        self.ds = SQLAlchemyDatasource.create(
            app_url,
            engine_kwargs={"pool_size": pool, "max_overflow": 0, "pool_timeout": POOL_TIMEOUT},
        )
        ds = self.ds

        @ds.transaction(isolation_level="READ COMMITTED")
        def do_step(saga_id: str, index: int, data: dict[str, Any], results: Results) -> Any:
            return business.do(ds.sql_session(), saga_id, index, data, results)

        @ds.transaction(isolation_level="READ COMMITTED")
        def undo_step(saga_id: str, index: int, data: dict[str, Any], results: Results) -> None:
            business.undo(ds.sql_session(), saga_id, index, data, results)

        @DBOS.workflow()
        def place_order(data: dict[str, Any]) -> str:
            saga_id = str(DBOS.workflow_id)
            results: Results = {}
            done: list[int] = []
            try:
                for index, step in enumerate(business.STEPS):
                    results[step.name] = do_step(saga_id, index, data, results)
                    done.append(index)
            except business.BusinessFailure:
                for index in reversed(done):
                    undo_step(saga_id, index, data, results)
                return "compensated"
            return "completed"

        self.workflow = place_order
        self.config = (
            f"DBOS {_version()}: in-process workflows, steps as datasource transactions "
            f"(READ COMMITTED), pools of {pool}, system database on the same PostgreSQL"
        )
        DBOS.launch()

    def run_one(self, index: int) -> tuple[str, str]:
        saga_id = str(uuid.uuid4())
        with SetWorkflowID(saga_id):
            status = self.workflow(workload.order(index))
        return saga_id, status

    def cpu_groups(self) -> dict[str, list[int] | str]:
        return {"postgres": "postgres", "rabbitmq": "beam.smp", "peer": [os.getpid()]}

    def close(self) -> None:
        DBOS.destroy()
        self.ds.engine.dispose()


def _version() -> str:
    return version("dbos")


def main() -> int:
    args = harness.arguments("place_order on DBOS Transact").parse_args()
    app_db, sys_db = f"{args.prefix}_dbos_app", f"{args.prefix}_dbos_sys"
    harness.prepare_app(args.admin_url, app_db, harness.total_orders(args))
    store.recreate_database(args.admin_url, sys_db)
    app = make_engine(harness.url(args.admin_url, app_db), pool_size=1)
    try:
        peer = DbosPeer(
            harness.url(args.admin_url, app_db),
            harness.url(args.admin_url, sys_db),
            args.concurrency,
        )
        result = harness.drive(peer, args, app, [app_db, sys_db])
        harness.emit(result)
        return 0
    finally:
        app.dispose()
        store.drop_database(args.admin_url, app_db)
        store.drop_database(args.admin_url, sys_db)


if __name__ == "__main__":
    sys.exit(main())
