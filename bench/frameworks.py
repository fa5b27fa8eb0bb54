"""Framework profiles against published figures.

TensorRT-LLM (framework: trtllm, its defaults: FP8 weights and KV on H100, max_batch_size 2048,
max_num_tokens 8192, GUARANTEED_NO_EVICT): offline throughput of Llama-3.1-8B on one H100-SXM at 128
input / 128 output tokens, against NVIDIA's published 28,837 output tokens/s (TensorRT-LLM
performance overview, https://nvidia.github.io/TensorRT-LLM/performance/perf-overview.html). The
same workload under vLLM's and SGLang's profiles (BF16) is printed beside it.

Usage: python bench/frameworks.py [--requests 30000]
"""
from __future__ import annotations

import argparse

PUBLISHED_TRTLLM_TOK_S = 28_837


def main() -> None:
    from fastsim.config import Config
    from fastsim.simulation import simulate

    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=30_000)
    args = ap.parse_args()
    for framework in ("trtllm", "vllm", "sglang"):
        cfg = Config(**{
            "model": "meta-llama/Llama-3.1-8B", "hardware": {"gpu": "H100-SXM"},
            "engine": {"framework": framework, "max_model_len": 2048,
                       **({} if framework == "trtllm" else {"max_num_seqs": 2048})},
            "workload": {"num_requests": args.requests, "clients": [{
                "arrival": {"process": "batch"}, "prompt_tokens": {"dist": "constant", "value": 128},
                "output_tokens": {"dist": "constant", "value": 128}}]}})
        s = simulate(cfg).summary
        line = (f"{framework:7s} Llama-3.1-8B H100-SXM 128/128 offline, {args.requests:,} requests: "
                f"{s['output_throughput']:,.0f} output tok/s (mean TPOT {s['mean_tpot_ms']:.1f} ms)")
        if framework == "trtllm":
            err = s["output_throughput"] / PUBLISHED_TRTLLM_TOK_S - 1
            line += f"; NVIDIA published {PUBLISHED_TRTLLM_TOK_S:,}: {err:+.1%}"
        print(line)


if __name__ == "__main__":
    main()
