"""How many sagas each sweep point runs, for sagabox and for every peer alike."""

from __future__ import annotations

import argparse

from sagabox.benchmarks.drive import SWEEP_ROUNDS, sweep_count
from sagabox.benchmarks.peers.harness import total_orders


def test_a_sweep_point_runs_several_rounds_of_its_concurrency() -> None:
    assert sweep_count(300, 16) == 300
    assert sweep_count(300, 128) == SWEEP_ROUNDS * 128 > 300


def test_a_peer_seeds_stock_for_every_saga_its_sweep_runs() -> None:
    args = argparse.Namespace(warmup=20, count=1500, rate=80.0, sweep="1, 128", sweep_count=300)
    assert total_orders(args) == 20 + 2 * 1500 + 300 + SWEEP_ROUNDS * 128
