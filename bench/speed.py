"""Engine speed: simulated requests per second of wall time, peak memory, compile time.

Llama-3-8B on H100-SXM, ShareGPT lengths, Poisson arrivals at ~80% of a replica's capacity
(measured first with an offline batch run), stepping every iteration exactly: one replica at each
size, then 64 data-parallel replicas (round-robin router, 64x the rate) at 1M requests.

Usage: python bench/speed.py [--sizes 10000,100000,1000000] [--replicas 1,64]
Each size runs in its own process so its peak RSS is its own. Compile time is measured cold (an
empty Numba cache) and cached.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

BASE = {
    "simulation": {"seed": 0, "mode": "exact"},
    "model": "meta-llama/Meta-Llama-3-8B",
    "hardware": {"gpu": "H100-SXM"},
    "engine": {"max_num_seqs": 256, "max_num_batched_tokens": 8192},
    "workload": {"num_requests": 1000, "clients": [
        {"arrival": {"process": "poisson", "rate": 1.0}, "dataset": {"name": "sharegpt"}}]},
}


def one_run(n: int, rate: float, repeats: int, replicas: int = 1) -> dict:
    """Best of `repeats` (shared machines are noisy; the minimum is the reproducible figure)."""
    from fastsim.config import Config
    from fastsim.simulation import simulate

    cfg = json.loads(json.dumps(BASE))
    cfg["workload"]["num_requests"] = n
    cfg["workload"]["clients"][0]["arrival"]["rate"] = rate * replicas
    cfg["engine"]["data_parallel_size"] = replicas
    cfg["cluster"] = {"router": "round_robin"}
    best_engine, best_total = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = simulate(Config(**cfg))
        best_total = min(best_total, time.perf_counter() - t0)
        best_engine = min(best_engine, r.summary["wall_time_s"])
    s = r.summary
    return {"n": n, "engine_wall_s": best_engine, "total_wall_s": best_total, "iterations": s["iterations"],
            "completed": s["completed"], "request_throughput": s["request_throughput"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def capacity() -> float:
    """Requests/s the replica sustains when every request is there at t=0."""
    from fastsim.config import Config
    from fastsim.simulation import simulate

    cfg = json.loads(json.dumps(BASE))
    cfg["workload"] = {"num_requests": 5000, "clients": [{"arrival": {"process": "batch"},
                                                          "dataset": {"name": "sharegpt"}}]}
    return simulate(Config(**cfg)).summary["request_throughput"]


def compile_seconds(cache_dir: str) -> float:
    code = ("import time, json; t=time.perf_counter(); import fastsim.simulation as s; from fastsim.config import Config;"
            f"s.simulate(Config(**{BASE!r})); print(time.perf_counter()-t)")
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--repeats", type=int, default=3, help="runs per size; the best is reported")
    ap.add_argument("--replicas", default="1,64", help="data-parallel replica counts to run")
    ap.add_argument("--child", nargs=4, type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one_run(int(a.child[0]), a.child[1], int(a.child[2]), int(a.child[3]))))
        return
    with tempfile.TemporaryDirectory() as d:
        cold = compile_seconds(d)
        warm = compile_seconds(d)
    print(f"first run of 1,000 requests incl. imports: cold Numba cache {cold:.1f} s, cached {warm:.2f} s")
    cap = capacity()
    rate = 0.8 * cap
    print(f"capacity (offline batch, ShareGPT lengths): {cap:.2f} req/s; running Poisson at {rate:.2f} req/s")
    print("engine s = the compiled simulation loop; total s = config to tables, incl. workload sampling")
    print(f"{'replicas':>8} {'requests':>10} {'engine s':>9} {'total s':>8} {'req/s (engine)':>15} {'req/s (total)':>14} "
          f"{'iterations':>11} {'peak RSS MB':>12}")
    runs = [(1, int(x)) for x in a.sizes.split(",")] if "1" in a.replicas.split(",") else []
    runs += [(int(k), 1_000_000) for k in a.replicas.split(",") if k != "1"]
    for replicas, n in runs:
        reps = a.repeats if n <= 100_000 else 1
        out = subprocess.run([sys.executable, __file__, "--child", str(n), str(rate), str(reps), str(replicas)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{replicas:>8} {n:>10,} {r['engine_wall_s']:>9.2f} {r['total_wall_s']:>8.2f} {n / r['engine_wall_s']:>15,.0f} "
              f"{n / r['total_wall_s']:>14,.0f} {r['iterations']:>11,} {r['peak_rss_mb']:>12,.0f}")


if __name__ == "__main__":
    main()
