"""Disaggregated prefill/decode against co-location on the same GPUs (the DistServe / Splitwise
comparison). Llama-3.1-8B on four H100-SXM: co-located = 4 vLLM replicas (data parallel, round
robin) vs 2 prefill + 2 decode and 3 prefill + 1 decode instances (KV over NVLink, overlapped).
ShareGPT chat at rising request rates; goodput = requests per second meeting both the TTFT and the
TPOT SLO (vLLM's --goodput), under a tight SLO pair and a loose one. Prints every curve.

Usage: python bench/disaggregation.py [--requests 1500]
"""
from __future__ import annotations

import argparse

RATES = (4, 8, 12, 16, 20, 24)
SLOS = {"tight": {"ttft_ms": 400, "tpot_ms": 15}, "loose": {"ttft_ms": 2000, "tpot_ms": 100}}
LAYOUTS = {"co-located x4": None, "2P2D": (2, 2), "3P1D": (3, 1)}


def goodput(rate: float, slo: dict, layout, n: int) -> float:
    from fastsim.config import Config
    from fastsim.simulation import simulate

    cluster = ({"disaggregation": {"prefill": {"count": layout[0]}, "decode": {"count": layout[1]},
                                   "kv_transfer": {"link": "nvlink"}}} if layout else {})
    cfg = Config(**{"model": "meta-llama/Llama-3.1-8B", "hardware": {"gpu": "H100-SXM"},
                    "engine": {"max_model_len": 16384, "data_parallel_size": 1 if layout else 4},
                    "cluster": cluster, "slo": slo,
                    "workload": {"num_requests": n, "clients": [{"arrival": {"process": "poisson", "rate": rate},
                                                                 "dataset": {"name": "sharegpt"}}]}})
    return simulate(cfg).summary["request_goodput"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1500)
    args = ap.parse_args()
    for name, slo in SLOS.items():
        print(f"{name} SLOs (TTFT {slo['ttft_ms']} ms, TPOT {slo['tpot_ms']} ms): goodput, requests/s")
        print(f"{'rate':>6}" + "".join(f"{k:>15}" for k in LAYOUTS))
        for rate in RATES:
            print(f"{rate:6.1f}" + "".join(f"{goodput(rate, slo, v, args.requests):15.2f}" for v in LAYOUTS.values()))


if __name__ == "__main__":
    main()
