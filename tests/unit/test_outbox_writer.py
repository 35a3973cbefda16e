"""When OutboxWriter notifies: on every row while quiet, at most every 50 ms while busy.

The statements themselves run against PostgreSQL in tests/integration; here a stand-in
connection only records which statements would have notified.
"""

from __future__ import annotations

from typing import Any

from outbox_relay.table import OutboxWriter, OutgoingMessage

ROW = OutgoingMessage("00000000-0000-0000-0000-000000000001", None, "q", "{}")


class Recorder:
    def __init__(self) -> None:
        self.notified: list[bool] = []

    def exec_driver_sql(self, sql: str, params: Any) -> None:
        self.notified.append("pg_notify" in sql)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def writes_at(times_ms: list[float]) -> list[bool]:
    clock, conn = Clock(), Recorder()
    writer = OutboxWriter(clock=clock)
    for t in times_ms:
        clock.now = t / 1000
        writer.write(conn, [ROW])  # type: ignore[arg-type]
    return conn.notified


def test_a_quiet_writer_notifies_on_every_row() -> None:
    assert writes_at([0, 8, 16, 30, 100]) == [True] * 5


def test_a_busy_writer_notifies_at_most_every_50_ms() -> None:
    # Rows 2 ms apart: the first notifies, then one per 50 ms.
    times = [2.0 * i for i in range(60)]
    notified = writes_at(times)
    assert [t for t, n in zip(times, notified, strict=True) if n] == [0.0, 50.0, 100.0]


def test_a_pause_after_a_burst_notifies_again_at_once() -> None:
    assert writes_at([0, 1, 2, 3, 9]) == [True, False, False, False, True]
