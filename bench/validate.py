"""fastsim against the development set of published serving measurements.

Runs every point of fastsim/validation/data/published_points.csv (vLLM CI, Argonne's
LLM-Inference-Bench, NVIDIA's TensorRT-LLM offline and Triton online tables) through
fastsim.simulate, configured as its source ran it (fastsim/validation/published.py), and prints the
relative error (fastsim / measured - 1) by source, GPU, model, TP, framework and metric, and the
worst rows. docs/validation.md shows its output.

Usage: python bench/validate.py [--seeds N] [--worst N] [--csv rows.csv]
"""
from __future__ import annotations

import argparse
import csv
import time

from fastsim.validation.kv_capacity import kv_capacity_markdown, kv_capacity_table
from fastsim.validation.published import RANDOM_SEEDS, validate
from fastsim.validation.report import markdown_tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=RANDOM_SEEDS, help="draws averaged where a run is random")
    ap.add_argument("--worst", type=int, default=15, help="how many of the worst rows to list")
    ap.add_argument("--csv", help="also write every row (point, metric, measured, fastsim, error) here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = validate(seeds=args.seeds)
    elapsed = time.perf_counter() - t0
    print(markdown_tables(rows, args.worst))
    print(f"{len({r.point.point_id for r in rows})} points, {len(rows)} metric rows, {elapsed:.1f} s")
    print("\nKV-cache capacity: fastsim's num_gpu_blocks against vLLM's logs (fastsim/validation/data/"
          "kv_cache_blocks.csv cites each)\n")
    print(kv_capacity_markdown(kv_capacity_table()))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["point_id", "source", "model", "gpu", "tp", "framework", "kind", "metric", "measured",
                        "fastsim", "error"])
            for r in rows:
                p = r.point
                w.writerow([p.point_id, p.source, p.model, p.gpu, p.tp, p.framework, p.kind, r.metric, r.measured,
                            r.predicted, r.error])


if __name__ == "__main__":
    main()
