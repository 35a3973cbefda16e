"""``--plot FILE.png``: throughput against concurrency, and latency CDFs (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from sagabox.benchmarks.drive import Run
from sagabox.benchmarks.errors import BenchError
from sagabox.benchmarks.run import Report


def plot(report: Report, path: Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415 - optional: only --plot needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as e:
        raise BenchError("--plot needs matplotlib: pip install -e '.[bench]'") from e
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for s in report.systems:
        points = {**s.sweep, report.options.concurrency: s.main.run}
        levels = sorted(points)
        left.plot(levels, [points[c].rate for c in levels], marker="o", label=s.name)
        line = right.plot(*_cdf(s.main.run), label=f"{s.name} (closed loop)")
        if s.open is not None:
            right.plot(
                *_cdf(s.open),
                linestyle="--",
                color=line[0].get_color(),
                label=f"{s.name} (open loop, {report.options.rate:g}/s)",
            )
    left.set(xlabel="sagas in flight (closed loop)", ylabel="sagas/s", xscale="log", yscale="log")
    left.set_title("throughput")
    right.set(xlabel="start-to-terminal latency (ms)", ylabel="fraction of sagas", xscale="log")
    right.set_title(f"latency CDF at concurrency {report.options.concurrency}")
    for axes in (left, right):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle("place_order (4 steps, 10% declined) on this machine")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _cdf(run: Run) -> tuple[list[float], list[float]]:
    ordered = sorted(run.latencies_ms)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]
