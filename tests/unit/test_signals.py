"""sagabox.signals: SIGTERM stops a process whatever its main thread holds.

Each case runs a small Python program in a subprocess whose main thread holds a lock
when SIGTERM comes, a lock the stop callback needs: the shape of a handler calling
``Event.set()`` while the main thread is inside ``Event.wait()``. Called from a plain
``signal.signal`` handler, the callback would run in the main thread and wait for
that lock forever (``test_a_plain_handler_deadlocks_there`` shows it)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent(
    """
    import signal, sys, threading, time
    from sagabox import signals

    lock = threading.Lock()
    stop = threading.Event()
    seen = []

    def on_stop(sig):
        with lock:
            seen.append((sig.name, threading.current_thread() is threading.main_thread()))
            stop.set()

    if sys.argv[1] == "plain":
        signal.signal(signal.SIGTERM, lambda signum, frame: on_stop(signal.Signals(signum)))
    else:
        signals.on_signals(on_stop)
    with lock:
        print("ready", flush=True)
        time.sleep(1.0)  # the signal comes here, the lock held
    stopped = stop.wait(10)
    print("stopped" if stopped else "not stopped", seen, flush=True)
    """
)


def _run(mode: str, sig: signal.Signals, timeout: float) -> subprocess.CompletedProcess[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(sig)
        out, err = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_callback_runs_in_its_own_thread_and_stops_the_process(sig: signal.Signals) -> None:
    done = _run("safe", sig, timeout=15)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stopped [('{sig.name}', False)]"


def test_a_plain_handler_deadlocks_there() -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        _run("plain", signal.SIGTERM, timeout=4)
