"""Prefix caching on the Mooncake traces: hit rates and replay speed.

For each trace (conversation and synthetic, from ../shared/data/traces unless --dir says otherwise):
  - the unbounded-cache hit rate computed from hash_ids alone (the issue's reference figure);
  - fastsim with a cache that never evicts and no overlap in time (every request alone);
  - a real-time replay on one H100 replica with prefix caching on and off: hit rate, evictions,
    preemptions, mean TTFT, and the engine's wall time (best of --repeats, after compilation) —
    on Llama-3-8B (8K context: the longer half of the requests is rejected) and on Llama-3.1-8B
    (the same shapes with the 128K context every request fits in).

Usage: python bench/prefix_replay.py [--dir ../shared/data/traces] [--repeats 3]
"""
from __future__ import annotations

import argparse
from pathlib import Path

TRACES = ("conversation_trace.jsonl", "synthetic_trace.jsonl")


def config(path: Path, apc: bool, isolated: bool, model: str = "meta-llama/Llama-3.1-8B"):
    from fastsim.config import Config
    engine = {"enable_prefix_caching": apc}
    client = {"name": "trace", "trace": {"format": "mooncake", "file": str(path)}}
    if isolated:  # one request at a time, a cache that holds everything: the unbounded figure's setting
        engine |= {"num_gpu_blocks_override": 1 << 22, "max_num_seqs": 1}
        client["trace"]["speedup"] = 1e-3
    return Config(model=model, hardware={"gpu": "H100-SXM"}, engine=engine,
                  workload={"clients": [client]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from fastsim.simulation import simulate
    from fastsim.workload.sharing import unbounded_prefix_hit_rate
    from fastsim.workload.traces import read_trace

    simulate(config(Path(args.dir) / TRACES[0], True, False))  # compile
    for name in TRACES:
        path = Path(args.dir) / name
        if not path.exists():
            raise SystemExit(f"{path} not found: pass --dir with the Mooncake traces")
        rows = read_trace("mooncake", str(path))
        print(f"{name}: {len(rows)} requests, unbounded-cache hit rate {unbounded_prefix_hit_rate(rows):.1%}")
        iso = simulate(config(path, True, True)).summary
        print(f"  fastsim, never evicting, one at a time: {iso['prefix_cache_hit_rate']:.1%} "
              f"({iso['rejected']} rejected)")
        for model in ("meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-3.1-8B"):
            for apc in (True, False):
                best = float("inf")
                for _ in range(args.repeats):
                    s = simulate(config(path, apc, False, model)).summary
                    best = min(best, s["wall_time_s"])
                print(f"  {model.split('/')[1]}, real time, one H100, prefix caching {'on ' if apc else 'off'}: "
                      f"{s['rejected']} rejected, hit rate {s['prefix_cache_hit_rate']:.1%}, evictions "
                      f"{s['prefix_cache_evictions']}, preemptions {s['preemptions']}, mean TTFT "
                      f"{s['mean_ttft_ms']:.0f} ms, engine wall {best:.3f} s")


if __name__ == "__main__":
    main()
