"""``sagabox up`` and the supervisor's restart policy: parsing and backoff without servers,
then the real command: databases set up, processes started, one killed and restarted,
all stopped on SIGTERM."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from outbox_relay.errors import ConfigurationError
from sagabox.settings import Env
from sagabox.supervisor import ProcessSpec, RestartPolicy, Supervisor
from sagabox.up import Replicas, UpConfig, parse_service_urls, sibling_url, specs
from tests import servers

URL = "postgresql://app:secret@db.example:5432/shop?sslmode=require"


def test_replicas_parse_and_reject_what_they_cannot_read() -> None:
    assert Replicas.parse("orchestrator=2,relay=3") == Replicas(2, 3, 1)
    assert Replicas.parse("") == Replicas()
    for bad in ("orchestrator", "workers=2", "relay=two", "relay=-1"):
        with pytest.raises(ConfigurationError, match="--replicas"):
            Replicas.parse(bad)


def test_participant_databases_come_from_the_variable_or_the_naming_scheme() -> None:
    assert sibling_url(URL, "inventory") == (
        "postgresql://app:secret@db.example:5432/shop_inventory?sslmode=require"
    )
    env = Env(
        {
            "SAGABOX_DATABASE_URL": URL,
            "SAGABOX_UP_PARTICIPANT_DATABASE_URLS": "payment=postgresql://p@other/pay",
        }
    )
    config = UpConfig.from_env(env, Replicas(2, 2, 2), services=["inventory", "payment"])
    assert config.participant_urls == {
        "inventory": "postgresql://app:secret@db.example:5432/shop_inventory?sslmode=require",
        "payment": "postgresql://p@other/pay",
    }
    names = [s.name for s in specs(config)]
    assert names == [
        "orchestrator-1",
        "orchestrator-2",
        "relay-1",
        "relay-2",
        "inventory-1",
        "inventory-2",
        "payment-1",
        "payment-2",
    ]
    relay = next(s for s in specs(config) if s.name == "relay-1")
    assert relay.env["SAGABOX_RELAY_DATABASE_URLS"].count("postgresql://") == 3
    with pytest.raises(ConfigurationError) as error:
        parse_service_urls("billing=postgresql://u:hunter2@h/db")
    assert "hunter2" not in str(error.value) and "SAGABOX_UP_PARTICIPANT_DATABASE_URLS" in str(
        error.value
    )
    with pytest.raises(ConfigurationError, match="--services"):
        UpConfig.from_env(env, Replicas(), services=["billing"])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_restart_backoff_doubles_and_resets_after_a_long_run(tmp_path: Path) -> None:
    policy = RestartPolicy(initial=1.0, maximum=4.0, reset_after=60.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    clock = Clock()
    supervisor = Supervisor(tmp_path, restart_policy=policy, clock=clock)
    spec = ProcessSpec("dies", [sys.executable, "-c", "raise SystemExit(3)"])
    supervisor.start(spec)
    delays = []
    for _ in range(3):
        supervisor.processes["dies"][1].wait()
        assert supervisor.tick() == []  # the death is noticed, a restart is scheduled
        due = supervisor._due["dies"]
        delays.append(due - clock.now)
        clock.now = due - 0.01
        assert supervisor.tick() == []
        clock.now = due
        [restart] = supervisor.tick()
        assert restart.exit_code == 3
    assert delays == [1.0, 2.0, 4.0]
    supervisor.processes["dies"][1].wait()
    clock.now += 120  # it ran "long enough" before this death: back to the first delay
    supervisor.tick()
    assert supervisor._due["dies"] - clock.now == 1.0
    supervisor.stop_all(1)
    assert supervisor.tick() == []  # nothing restarts once stopping
    assert supervisor.restarts == {"dies": 3}


def test_a_stopped_process_is_not_restarted(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path, restart_policy=RestartPolicy(initial=0.0))
    supervisor.start(ProcessSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"]))
    assert supervisor.stop("sleeper", timeout=5) == -signal.SIGTERM
    assert supervisor.tick() == [] and supervisor.tick() == []
    assert supervisor.restarts == {}


def read_lines(stream: object, lines: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line.rstrip("\n"))


def expect(lines: queue.Queue[str], pattern: str, timeout: float, seen: list[str]) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(seen))


def drain(lines: queue.Queue[str], seen: list[str]) -> None:
    while True:
        try:
            seen.append(lines.get_nowait())
        except queue.Empty:
            return


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped yet) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1][0] != "Z"


@pytest.mark.integration
def test_sagabox_up_sets_up_restarts_what_dies_and_stops_on_sigterm(
    db_url: str, amqp_url: str, tmp_path: Path
) -> None:
    inventory_db = db_url.rpartition("/")[2] + "_inventory"  # the default naming scheme
    env = {
        **os.environ,
        "SAGABOX_DATABASE_URL": db_url,
        "SAGABOX_AMQP_URL": amqp_url,
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("SAGABOX_UP_PARTICIPANT_DATABASE_URLS", None)
    argv = [sys.executable, "-m", "sagabox", "up", "--setup", "--services", "inventory"]
    argv += ["--replicas", "relay=2", "--threads", "1", "--log-dir", str(tmp_path / "logs")]
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
    seen: list[str] = []
    pids: dict[str, int] = {}
    new_pid = 0
    try:
        for name in ("orchestrator-1", "relay-1", "relay-2", "inventory-1"):
            match = expect(lines, rf"started {name} \(pid (\d+)\), logs: (\S+)", 120, seen)
            pids[name] = int(match[1])
            assert match[2] == str(tmp_path / "logs" / f"{name}.log")
        assert any("inventory database" in line and "_inventory" in line for line in seen)
        os.kill(pids["relay-1"], signal.SIGKILL)
        restarted = r"restarted relay-1 \(exit -9, failure 1 in a row\), pid (\d+)"
        match = expect(lines, restarted, 20, seen)
        new_pid = int(match[1])
        assert new_pid != pids["relay-1"] and alive(new_pid)
        relay_log = tmp_path / "logs" / "relay-1.log"
        deadline = time.monotonic() + 40
        while "relay_started" not in relay_log.read_text():  # the new relay-1 is serving
            assert time.monotonic() < deadline, relay_log.read_text()
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            drain(lines, seen)
            running = [n for n, p in pids.items() if alive(p)]
            raise AssertionError(
                f"sagabox up still running 40 s after SIGTERM; alive: {running}; said:\n"
                + "\n".join(seen)
            ) from None
        assert code == 0, "\n".join(seen)
        expect(lines, r"stopped: ", 5, seen)
        for pid in [*pids.values(), new_pid]:
            assert not alive(pid), f"pid {pid} still running after sagabox up stopped"
        for name in pids:
            assert (tmp_path / "logs" / f"{name}.log").exists(), name
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        # Its processes run in sessions of their own: none may outlive the test.
        for pid in [*pids.values(), *([new_pid] if new_pid else [])]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        servers.drop_database(inventory_db)
