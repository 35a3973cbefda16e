"""When OutboxWriter notifies: on every row while quiet, at most every 50 ms while busy,
and only after a NOTIFY that said DEBOUNCING.

The statements themselves run against PostgreSQL in tests/integration; here a stand-in
connection only records which statements would have notified.
"""

from __future__ import annotations

from typing import Any

from outbox_relay.table import DEBOUNCING, OutboxWriter, OutgoingMessage

ROW = OutgoingMessage("00000000-0000-0000-0000-000000000001", None, "q", "{}")


class Recorder:
    def __init__(self) -> None:
        self.notified: list[bool] = []
        self.payloads: list[str] = []

    def exec_driver_sql(self, sql: str, params: Any) -> None:
        self.notified.append("pg_notify" in sql)
        if "pg_notify" in sql:
            self.payloads.append(sql.rsplit("'", 2)[-2])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def writes_at(times_ms: list[float], *, rolled_back_at: float | None = None) -> Recorder:
    clock, conn = Clock(), Recorder()
    writer = OutboxWriter(clock=clock)
    for t in times_ms:
        clock.now = t / 1000
        writer.write(conn, [ROW])  # type: ignore[arg-type]
        if t == rolled_back_at:
            writer.rolled_back()
    return conn


def test_a_quiet_writer_notifies_on_every_row_and_promises_no_gap() -> None:
    conn = writes_at([0, 8, 16, 30, 100])
    assert conn.notified == [True] * 5
    assert conn.payloads == [""] * 5


def test_a_busy_writer_says_so_then_notifies_at_most_every_50_ms() -> None:
    # Rows 3 ms apart: the first notifies as a quiet one; the second says DEBOUNCING
    # before any NOTIFY is skipped; then one per 50 ms.
    times = [3.0 * i for i in range(40)]
    conn = writes_at(times)
    assert [t for t, n in zip(times, conn.notified, strict=True) if n] == [0.0, 3.0, 54.0, 105.0]
    assert conn.payloads == ["", DEBOUNCING, DEBOUNCING, DEBOUNCING]


def test_a_pause_after_a_burst_notifies_again_at_once() -> None:
    conn = writes_at([0, 1, 2, 3, 9])
    assert conn.notified == [True, True, False, False, True]
    # Busy a moment ago: the writer still says it may skip, so its next busy row can.
    assert conn.payloads == ["", DEBOUNCING, DEBOUNCING]
    conn = writes_at([0, 1, 9, 10, 11, 1200, 1201])
    assert conn.notified == [True, True, True, False, False, True, True]
    # A second after its last busy row the writer is quiet again, and says so.
    assert conn.payloads == ["", DEBOUNCING, DEBOUNCING, "", DEBOUNCING]


def test_after_a_rollback_the_next_row_notifies() -> None:
    # The NOTIFY of the row at 1 ms never went out: the row at 2 ms must not rely on it.
    conn = writes_at([0, 1, 2, 3], rolled_back_at=1)
    assert conn.notified == [True, True, True, False]
