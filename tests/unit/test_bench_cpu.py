"""The benchmark's CPU accounting: a process belongs to one group only."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from sagabox.benchmarks import cpu


def stat(pid: int, ppid: int) -> cpu.Stat:
    return cpu.Stat(pid, "python3", ppid, 1.0, 0.0)


def test_descendants_stop_at_processes_another_group_names() -> None:
    # 1 started 2 (a server, its own group) and 3; 2 started 4.
    stats = [stat(1, 0), stat(2, 1), stat(3, 1), stat(4, 2)]
    assert cpu.descendants([1], stats) == {1, 2, 3, 4}
    assert cpu.descendants([1], stats, stop=[2]) == {1, 3}
    assert cpu.descendants([2], stats, stop=[]) == {2, 4}


def test_a_child_named_in_its_own_group_is_not_counted_in_its_parents() -> None:
    # A live child: it burns 0.5 s of CPU, then sleeps while the parent samples.
    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    code = burn + "\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while (s := cpu.stat(child.pid)) is None or s.cpu < 0.4:
            assert time.monotonic() < deadline, "the child did not burn its CPU"
            time.sleep(0.05)
        mine = cpu.stat(os.getpid())
        assert mine is not None
        alone = cpu.sample({"me": [os.getpid()]}).groups["me"]
        split = cpu.sample({"me": [os.getpid()], "child": [child.pid]}).groups
        assert alone >= mine.cpu + 0.4  # with no group of its own, the child is mine
        assert split["child"] >= 0.4
        # With one, it is not (compared with the first sample, not with this process
        # alone: other descendants, a test's leftovers say, count in both).
        assert split["me"] < alone - 0.3
    finally:
        child.kill()
        child.wait()
