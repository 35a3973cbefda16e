"""Stopping on SIGTERM and SIGINT without running anything in the interrupted thread.

A Python signal handler runs in the main thread between two bytecodes, wherever that
thread happens to be, perhaps holding the very lock the handler would take:
``threading.Event.set()`` from a handler deadlocks when the main thread was interrupted
inside ``Event.wait()`` while holding the event's condition lock (a plain ``Lock``), and
``print`` from a handler fails when the main thread was inside ``print``
(python/cpython#126434 discusses the family). The process then ignores the signal for
good: its children never hear of it and its supervisor must SIGKILL it.

So the Python-level handler here does nothing. CPython's C-level handler writes the
signal's number to the wakeup file descriptor (``signal.set_wakeup_fd``, as asyncio's
loop does), and a thread of our own reads it and calls back, as any thread would: it
may take locks, log and print.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ignore(_: int, __: FrameType | None) -> None:
    """Installed so that CPython's C handler runs (and writes to the wakeup fd)."""


def on_signals(
    callback: Callable[[signal.Signals], None],
    signals: Iterable[signal.Signals] = STOP_SIGNALS,
) -> None:
    """Call ``callback(signal)`` from a daemon thread each time one of ``signals`` arrives.

    Call it from the main thread (as ``signal.signal`` requires), once per process: a
    process has one wakeup file descriptor.
    """
    wanted = set(signals)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    # A full pipe (a storm of signals nobody reads) drops bytes silently instead of
    # printing warnings from inside the C handler.
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    for sig in wanted:
        signal.signal(sig, _ignore)

    def pump() -> None:
        while True:
            for number in os.read(read_end, 64):
                if number in wanted:
                    callback(signal.Signals(number))

    threading.Thread(target=pump, name="signals", daemon=True).start()
