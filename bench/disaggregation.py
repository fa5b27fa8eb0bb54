"""Disaggregated prefill/decode against co-location on the same GPUs (the DistServe / Splitwise
comparison). Llama-3.1-8B on four H100-SXM: co-located = 4 vLLM replicas (data parallel, round
robin, chunked prefill) vs 1P3D, 2P2D and 3P1D prefill/decode instances (KV over NVLink, overlapped).

DistServe's measure: SLO attainment (the fraction of requests meeting both the TTFT and the per-request
TPOT SLO) against request rate, and per layout the highest rate at which 90% attain (found by
bisection). Workloads: ShareGPT chat and arXiv summarization (long prompts, short answers). SLO pairs:
tight (TPOT 11 ms, just above an H100's decode step for this model: prefill chunks in a co-located
batch push it over) and loose (TPOT 100 ms). The DistServe result is that the best disaggregated layout
sustains more load than co-location at tight SLOs and less at loose ones.

Usage: python bench/disaggregation.py [--requests 1000]
"""
from __future__ import annotations

import argparse

SLOS = {"tight": {"ttft_ms": 400, "tpot_ms": 11}, "loose": {"ttft_ms": 2000, "tpot_ms": 100}}
WORKLOADS = {"sharegpt": {"tight": (4, 8, 12), "loose": (16, 28, 40)},
             "arxiv": {"tight": (6, 10, 14), "loose": (18, 26, 34)}}
LAYOUTS = {"co-located": None, "1P3D": (1, 3), "2P2D": (2, 2), "3P1D": (3, 1)}
TARGET = 0.9


def attainment(rate: float, slo: dict, layout, dataset: str, n: int) -> float:
    from fastsim.config import Config
    from fastsim.simulation import simulate

    cluster = ({"disaggregation": {"prefill": {"count": layout[0]}, "decode": {"count": layout[1]},
                                   "kv_transfer": {"link": "nvlink"}}} if layout else {})
    cfg = Config(**{"model": "meta-llama/Llama-3.1-8B", "hardware": {"gpu": "H100-SXM"},
                    "engine": {"max_model_len": 16384, "data_parallel_size": 1 if layout else 4},
                    "cluster": cluster, "slo": slo,
                    "workload": {"num_requests": n, "clients": [{"arrival": {"process": "poisson", "rate": rate},
                                                                 "dataset": {"name": dataset}}]}})
    t = simulate(cfg).requests
    ok = 0
    for status, ttft, tpot in zip(t.column("status").to_pylist(), t.column("ttft_ms").to_pylist(),
                                  t.column("tpot_ms").to_pylist()):
        ok += status == "finished" and ttft <= slo["ttft_ms"] and (tpot is None or tpot <= slo["tpot_ms"])
    return ok / t.num_rows


def max_rate(slo: dict, layout, dataset: str, n: int) -> float:
    """Highest request rate (to 2%) at which TARGET of requests meet the SLOs."""
    lo, hi = 0.0, 1.0
    while attainment(hi, slo, layout, dataset, n) >= TARGET and hi < 256:
        lo, hi = hi, hi * 2
    while hi - lo > 0.02 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if attainment(mid, slo, layout, dataset, n) >= TARGET else (lo, mid)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args()
    for dataset, rates in WORKLOADS.items():
        for name, slo in SLOS.items():
            print(f"\n{dataset}, {name} SLOs (TTFT {slo['ttft_ms']} ms, TPOT {slo['tpot_ms']} ms): attainment")
            print(f"{'rate':>6}" + "".join(f"{k:>12}" for k in LAYOUTS))
            for rate in rates[name]:
                print(f"{rate:6.1f}" + "".join(f"{attainment(rate, slo, v, dataset, args.requests):12.2f}"
                                                for v in LAYOUTS.values()))
            best = {k: max_rate(slo, v, dataset, args.requests) for k, v in LAYOUTS.items()}
            print("max rate at 90% attainment:" + "".join(f"  {k} {r:.2f}" for k, r in best.items()))
            dis = max((k for k in LAYOUTS if k != "co-located"), key=best.get)
            print(f"  best disaggregated ({dis}) / co-located: {best[dis] / best['co-located']:.2f}x")


if __name__ == "__main__":
    main()
