"""Cost-model evaluation speed: forward_time from Python, and the per-iteration kernel in Numba.

Usage: python bench/cost_speed.py
"""
from __future__ import annotations

import time

import numpy as np
from numba import njit

from fastsim.cost import CostModel
from fastsim.engine import cost_nb as nb
from fastsim.engine.bundles import Batch


@njit(cache=True)
def _many_tabled_nb(p, tok, seq, n, dec_counts, dec_keys):
    acc = 0.0
    for i in range(n):
        j = i % dec_counts.size
        body, head = nb.stage_time_nb(p, tok, seq, 0, 0, Batch(dec_counts[j], dec_keys[j], 1, 512, 131328.0, 512.0))
        acc += body + head
    return acc


@njit(cache=True)
def _many_iterations_nb(p, ops, n, dec_counts, dec_keys):
    """n evaluations of forward_time_nb with varying aggregates, as the engine makes them."""
    acc = 0.0
    for i in range(n):
        j = i % dec_counts.size
        c, m = nb.forward_time_nb(p, ops, dec_counts[j], dec_keys[j], 1, 512.0, 131328.0, 512.0)
        acc += c + m
    return acc


def main() -> None:
    cm = CostModel.create("meta-llama/Meta-Llama-3-8B", "H100-SXM")
    dec = np.random.default_rng(0).integers(100, 4000, size=256)
    cm.forward_time(dec)  # compile / load cache
    reps = 2000
    t0 = time.perf_counter()
    for _ in range(reps):
        cm.forward_time(dec)
    py_us = (time.perf_counter() - t0) / reps * 1e6
    print(f"forward_time(256 decodes) from Python: {py_us:.1f} us per call")

    counts = np.arange(1, 257, dtype=np.int64)
    keys = counts * 2000.0
    _many_iterations_nb(cm.params, cm.ops, 10, counts, keys)
    n = 2_000_000
    t0 = time.perf_counter()
    _many_iterations_nb(cm.params, cm.ops, n, counts, keys)
    nb_ns = (time.perf_counter() - t0) / n * 1e9
    print(f"forward_time_nb inside Numba (mixed batch, closed form): {nb_ns:.0f} ns per iteration")
    tok, seq = nb.build_tables_nb(cm.params, cm.ops, 8192 + 256, 256)
    _many_tabled_nb(cm.params, tok, seq, 10, counts, keys)
    t0 = time.perf_counter()
    _many_tabled_nb(cm.params, tok, seq, n, counts, keys)
    tab_ns = (time.perf_counter() - t0) / n * 1e9
    print(f"stage_time_nb inside Numba (what the engine calls, mixed batch): {tab_ns:.0f} ns per iteration")


if __name__ == "__main__":
    main()
