"""Sweep speed: a 1,000-point sweep of 10,000-request simulations (Llama-3-8B on H100, ShareGPT)
on every local core — rate 1..10 req/s x max_num_seqs x max_num_batched_tokens x
gpu_memory_utilization — and `fastsim capacity` on the default scenario. Prints wall times.

Usage: python bench/sweep.py [--jobs N] [--requests 10000]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--requests", type=int, default=10_000)
    args = ap.parse_args()
    fastsim = [sys.executable, "-m", "fastsim.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        grid = ["--grid", "workload.clients.0.arrival.rate=1:10:1", "--grid", "engine.max_num_seqs=32,64,128,256,512",
                "--grid", "engine.max_num_batched_tokens=2048,4096,8192,16384",
                "--grid", "engine.gpu_memory_utilization=0.5:0.9:0.1"]
        t0 = time.perf_counter()
        subprocess.run(fastsim + ["sweep", *grid, "--set", f"workload.num_requests={args.requests}", "-j",
                                  str(args.jobs), "-q", "-o", f"{tmp}/sw"], check=True)
        sweep_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run(fastsim + ["sweep", *grid, "--set", f"workload.num_requests={args.requests}", "-q", "-o",
                                  f"{tmp}/sw"], check=True, capture_output=True)
        rerun_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run(fastsim + ["capacity", "--slo", "ttft_ms:p99=500", "--slo", "tpot_ms:p99=50", "-o",
                                  f"{tmp}/cap"], check=True)
        cap_s = time.perf_counter() - t0
    print(f"1,000-point sweep of {args.requests:,}-request simulations on {args.jobs} workers: {sweep_s:.1f} s "
          f"(whole command); re-run skipping every point: {rerun_s:.1f} s")
    print(f"fastsim capacity, default scenario (whole command, incl. ~3 s start-up): {cap_s:.1f} s")


if __name__ == "__main__":
    main()
