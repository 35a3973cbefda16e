"""Closed-loop and open-loop load: the same driver for sagabox and every peer.

``run_one(index)`` runs saga ``index`` to its end and returns (saga id, status). The
closed loop keeps ``concurrency`` sagas in flight; the open loop starts one every
``1 / rate`` seconds whatever the response times, so a slow system cannot hide its
queueing: latency is measured from the scheduled arrival, not from the call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

RunOne = Callable[[int], tuple[str, str]]

# Seconds one saga may take, from its call to its end, in any system. An open loop
# faster than the system queues arrivals for minutes (1,500 at 90/s on a system doing
# 15/s: the last waits about 80 s); that must show as latency, not end the run.
SAGA_TIMEOUT = 600.0


@dataclass
class Run:
    """What one driven run measured."""

    count: int
    seconds: float
    latencies_ms: list[float]
    statuses: dict[str, str] = field(default_factory=dict)  # saga id -> status
    expected: dict[str, int] = field(default_factory=dict)  # saga id -> order index

    @property
    def ids(self) -> list[str]:
        return list(self.statuses)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# A closed loop's sagas per concurrency, at least: C sagas start at once and the last
# ones end with fewer than C in flight, so a run of barely more than C sagas measures
# its ramp and drain more than the system (at concurrency 128, 300 sagas gave 10% fewer
# sagas/s than 3,000 in one run). Every system's sweep takes the same count.
SWEEP_ROUNDS = 4


def sweep_count(count: int, concurrency: int) -> int:
    """Sagas for the sweep point at ``concurrency``: ``count``, or SWEEP_ROUNDS times
    the concurrency if that is more."""
    return max(count, SWEEP_ROUNDS * concurrency)


def closed_loop(run_one: RunOne, count: int, concurrency: int, first: int = 0) -> Run:
    """``count`` sagas, ``concurrency`` at a time; each worker starts the next as one ends."""
    lock = threading.Lock()
    next_index = iter(range(first, first + count))
    run = Run(count, 0.0, [])
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                index = None if errors else next(next_index, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                saga_id, status = run_one(index)
            except BaseException as e:
                with lock:
                    errors.append(e)
                return
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                run.latencies_ms.append(elapsed)
                run.statuses[saga_id] = status
                run.expected[saga_id] = index

    t0 = time.perf_counter()
    _join([threading.Thread(target=worker, daemon=True) for _ in range(concurrency)])
    run.seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return run


def open_loop(
    run_one: RunOne, count: int, rate: float, first: int = 0, max_in_flight: int = 512
) -> Run:
    """``count`` sagas arriving every ``1 / rate`` s; latency counts from each arrival."""
    lock = threading.Lock()
    run = Run(count, 0.0, [])

    def one(index: int, arrival: float) -> None:
        saga_id, status = run_one(index)
        elapsed = (time.perf_counter() - arrival) * 1000
        with lock:
            run.latencies_ms.append(elapsed)
            run.statuses[saga_id] = status
            run.expected[saga_id] = index

    t0 = time.perf_counter()
    futures: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=max_in_flight) as pool:
        for i in range(count):
            arrival = t0 + i / rate
            pause = arrival - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            futures.append(pool.submit(one, first + i, arrival))
    run.seconds = time.perf_counter() - t0
    for future in futures:
        future.result()  # re-raise the first failure
    return run


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join()
