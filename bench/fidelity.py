"""Fidelity against measured vLLM serving: whole-batch latency of offline batches.

vLLM's CI (a batch of 8 requests of 32 input / 128 output tokens, ignore_eos) measured Llama-3-8B at
997.5 ms on one H100, 1579 ms on one A100-SXM-80GB and 833 ms on one H200, and Llama-3-70B with
tensor parallelism 4 at 2444.5 ms on H100 and 3990.6 ms on A100-SXM-80GB. fastsim runs the same
batch offline (all requests at t=0) and compares the time until the last request finishes.

Usage: python bench/fidelity.py
"""
from __future__ import annotations

from fastsim.config import Config
from fastsim.simulation import simulate

POINTS = [  # (model, gpu, tensor_parallel_size, measured whole-batch latency in ms)
    ("meta-llama/Meta-Llama-3-8B", "H100-SXM", 1, 997.5),
    ("meta-llama/Meta-Llama-3-8B", "A100-SXM-80GB", 1, 1579.0),
    ("meta-llama/Meta-Llama-3-8B", "H200-SXM", 1, 833.0),
    ("meta-llama/Meta-Llama-3-70B", "H100-SXM", 4, 2444.5),
    ("meta-llama/Meta-Llama-3-70B", "A100-SXM-80GB", 4, 3990.6),
]


def batch_latency_ms(model: str, gpu: str, tp: int, batch: int = 8, prompt: int = 32, output: int = 128) -> float:
    cfg = Config(
        model=model, hardware={"gpu": gpu}, engine={"tensor_parallel_size": tp},
        workload={"num_requests": batch, "clients": [{
            "arrival": {"process": "batch"},
            "prompt_tokens": {"dist": "constant", "value": prompt},
            "output_tokens": {"dist": "constant", "value": output}}]})
    return simulate(cfg).requests.column("finish_s").to_numpy().max() * 1e3


def main() -> None:
    print(f"{'model':30} {'gpu':14} {'tp':>2} {'measured ms':>12} {'fastsim ms':>11} {'error':>7}")
    errors = []
    for model, gpu, tp, measured in POINTS:
        got = batch_latency_ms(model, gpu, tp)
        err = got / measured - 1
        errors.append(abs(err))
        print(f"{model:30} {gpu:14} {tp:>2} {measured:>12.1f} {got:>11.1f} {100 * err:>+6.1f}%")
    print(f"max |error| {100 * max(errors):.1f}% (target: within 10% each)")


if __name__ == "__main__":
    main()
