"""CPU time of processes, read from /proc/<pid>/stat (Linux only).

A process's CPU is utime + stime. Processes that exit between two samples would lose
their time, so the postmaster's cutime + cstime (the CPU of the backends it reaped)
is counted too: a backend that disconnects mid-run keeps its share.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class Stat:
    pid: int
    comm: str
    ppid: int
    cpu: float  # seconds: utime + stime
    children_cpu: float  # seconds: cutime + cstime (reaped children)


def stat(pid: int) -> Stat | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: split around the last ')'.
    head, _, tail = raw.rpartition(")")
    comm = head.partition("(")[2]
    fields = tail.split()
    # fields[0] is the state (field 3); utime is field 14, cutime field 16.
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return Stat(pid, comm, int(fields[1]), (utime + stime) / TICK, (cutime + cstime) / TICK)


def all_stats() -> list[Stat]:
    stats = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (s := stat(int(entry.name))) is not None:
            stats.append(s)
    return stats


def descendants(roots: Iterable[int], stats: Iterable[Stat], stop: Iterable[int] = ()) -> set[int]:
    """The roots and every process below them, except ``stop`` and what is below it."""
    children: dict[int, list[int]] = {}
    for s in stats:
        children.setdefault(s.ppid, []).append(s.pid)
    found: set[int] = set()
    fences = set(stop)
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += [child for child in children.get(pid, []) if child not in fences]
    return found


@dataclass(frozen=True, slots=True)
class Sample:
    """CPU seconds per group of processes at one instant."""

    groups: Mapping[str, float]


def sample(groups: Mapping[str, Iterable[int] | str]) -> Sample:
    """CPU seconds of each group: a set of pids (with their descendants) or a process name.

    A name (``postgres``, ``beam.smp``) counts every process of that name, and the
    reaped children of the eldest one (the postmaster). A process named in a group is
    that group's alone, even if it descends from another group's (a peer that started
    its server, the benchmark that started sagabox's processes).
    """
    stats = all_stats()
    by_pid = {s.pid: s for s in stats}
    pids = {name: set(m) for name, m in groups.items() if not isinstance(m, str)}
    claimed = set().union(*pids.values())
    out: dict[str, float] = {}
    for name, members in groups.items():
        if isinstance(members, str):
            named = [s for s in stats if s.comm == members]
            total = sum(s.cpu for s in named)
            roots = [s for s in named if by_pid.get(s.ppid, s).comm != members]
            total += sum(s.children_cpu for s in roots)
        else:
            mine = pids[name]
            below = descendants(mine, stats, stop=claimed - mine)
            total = sum(by_pid[p].cpu for p in below if p in by_pid)
        out[name] = total
    return Sample(out)


def delta(before: Sample, after: Sample) -> dict[str, float]:
    return {k: after.groups.get(k, 0.0) - v for k, v in before.groups.items()}
