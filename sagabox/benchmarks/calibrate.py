"""How fast the machine is right now: a fixed Python workload and a PostgreSQL round trip.

This kind of machine changes speed by a quarter within an hour, the same code measured
side by side (docs/benchmarks.md, 30 November). Every system in one run shares the
machine, so ratios hold; absolute figures of two runs compare only as far as the
machine ran alike. A run measures both references before and after itself, so a reader
sees how fast the machine was and whether it drifted meanwhile.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import psycopg

from sagabox.benchmarks import cpu

# Shaped like a saga message: the hot path's JSON and uuid5 work, no I/O.
_PAYLOAD = {
    "message_id": "6f1c0f0e-3c1a-4f6e-9a51-2b8d5d7c9e10",
    "correlation_id": "0b9b1f32-7d0b-4f4c-8d55-3f7f3b0e6a41",
    "kind": "command",
    "type": "charge_payment",
    "step": "charge",
    "attempt": 1,
    "payload": {"customer": "c-17", "amount": 1250, "items": [{"sku": "apple", "qty": 2}] * 4},
    "slip": [{"step": s, "type": f"{s}_type", "payload": {"n": i}} for i, s in enumerate("abcd")],
}
_NAMESPACE = uuid.UUID("5b0f9d3e-3f43-4a4f-9a0e-6d1f5c7b2a11")


@dataclass(frozen=True)
class Calibration:
    """Microseconds: one pass of the Python workload (CPU); one ``SELECT 1`` (wall), and
    the CPU it cost the client and the server together (NaN where /proc cannot tell)."""

    python_us: float
    roundtrip_us: float
    roundtrip_cpu_us: float = float("nan")


def python_us(iterations: int = 4000, repeats: int = 5) -> float:
    """CPU time of one pass of the workload, the fastest of ``repeats`` batches (the
    machine's speed, less the moments another process took the core)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for i in range(iterations):
            text = json.dumps(_PAYLOAD, separators=(",", ":"))
            json.loads(text)
            uuid.uuid5(_NAMESPACE, f"{i}/command/1")
        best = min(best, time.process_time() - started)
    return 1e6 * best / iterations


def roundtrip(admin_url: str, queries: int = 1000, repeats: int = 3) -> tuple[float, float]:
    """One ``SELECT 1`` on loopback: its wall time, the fastest of ``repeats`` batches, and
    its CPU on both sides over all of them. A saga's cost is mostly such round trips (to
    PostgreSQL, and their like to RabbitMQ): this is the figure that moves with it."""
    best = float("inf")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT 1")
        server = conn.info.backend_pid
        before = time.process_time(), cpu.stat(server)
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(queries):
                conn.execute("SELECT 1").fetchone()
            best = min(best, time.perf_counter() - started)
        after = time.process_time(), cpu.stat(server)
    spent = float("nan")
    if before[1] is not None and after[1] is not None:
        spent = (after[0] - before[0]) + (after[1].cpu - before[1].cpu)
    return 1e6 * best / queries, 1e6 * spent / (queries * repeats)


def measure(admin_url: str) -> Calibration:
    return Calibration(python_us(), *roundtrip(admin_url))
