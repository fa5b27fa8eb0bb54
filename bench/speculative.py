"""Where speculative decoding stops paying, and what MoE decoding reads.

1. Per-token decode time of Llama-3.1-8B on one H100-SXM, by batch size, without speculation and with
   num_speculative_tokens 4 at acceptance 0.8 (n-gram, EAGLE head, Qwen2.5-1.5B draft model), at a
   short and a long context: the speed-up and the batch size where it falls below 1 (the crossover).
2. The same through the engine: the default workload at rising request rates, mean TPOT and output
   throughput with and without EAGLE speculation.
3. Mixtral-8x7B: expected experts read per layer and the decode step time by batch size.

Usage: python bench/speculative.py [--requests 2000]
"""
from __future__ import annotations

import argparse

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
METHODS = (("ngram", None), ("eagle", None), ("draft_model", "Qwen/Qwen2.5-1.5B"))


def crossover_table() -> None:
    from fastsim.config import SpeculativeConfig
    from fastsim.cost import CostModel
    from fastsim.cost.speculative import decode_step_s, speculative_cost_model

    from fastsim.catalog import load_gpu, load_model
    from fastsim.config import Engine
    from fastsim.memory import memory_plan

    cm = CostModel.create("meta-llama/Llama-3.1-8B", "H100-SXM")
    kv_tokens = memory_plan(load_model("meta-llama/Llama-3.1-8B"), load_gpu("H100-SXM"), Engine()).kv_tokens
    base = speculative_cost_model(cm, None, max(BATCHES), 8192, 0.33e-3)
    print("Llama-3.1-8B, H100-SXM: per-token decode time (ms) and speed-up with num_speculative_tokens 4, "
          "acceptance 0.8 (E = 3.36 tokens per step)")
    for context in (256, 2048):
        print(f"\ncontext {context} tokens")
        print(f"{'batch':>6s} {'none':>8s} {'tok/s':>8s} " + " ".join(f"{m:>19s}" for m, _ in METHODS)
              + "   (ms per token; throughput = batch / that, so it gains the same factor)")
        tables = [speculative_cost_model(cm, SpeculativeConfig(method=m, model=d, num_speculative_tokens=4,
                                                               acceptance_rate=0.8), max(BATCHES), 8192, 0.33e-3)
                  for m, d in METHODS]
        cross = [None] * len(METHODS)
        for b in BATCHES:
            t0 = decode_step_s(*base, b, context)
            cells = []
            for i, t in enumerate(tables):
                t1 = decode_step_s(*t, b, context)
                if t1 >= t0 and cross[i] is None:
                    cross[i] = b
                cells.append(f"{t1 * 1e3:8.3f} ({t0 / t1:4.2f}x)")
            fits = "" if b * (context + 5) <= kv_tokens else f"  (batch x context > the {kv_tokens:,}-token KV cache)"
            print(f"{b:6d} {t0 * 1e3:8.3f} {b / t0:8.0f} " + " ".join(f"{c:>19s}" for c in cells) + fits)
        for (m, _), c in zip(METHODS, cross):
            print(f"  {m}: stops paying at batch {c}" if c else f"  {m}: still pays at batch {max(BATCHES)}")


def engine_runs(requests: int) -> None:
    from fastsim.config import load_config
    from fastsim.simulation import simulate

    print("\nThrough the engine: Llama-3.1-8B, one H100-SXM, the default workload (fastsim run with no config)")
    print(f"{'rate':>6s} {'TPOT none':>10s} {'TPOT eagle':>11s} {'tok/s none':>11s} {'tok/s eagle':>12s}")
    for rate in (1, 4, 16, 64):
        row = []
        for extra in ([], ["engine.speculative_config={method: eagle, num_speculative_tokens: 4, "
                           "acceptance_rate: 0.8}"]):
            s = simulate(load_config(None, ["model=meta-llama/Llama-3.1-8B", f"workload.num_requests={requests}",
                                            f"workload.clients.0.arrival.rate={rate}"] + extra)).summary
            row.append((s["mean_tpot_ms"], s["output_throughput"]))
        print(f"{rate:6d} {row[0][0]:10.2f} {row[1][0]:11.2f} {row[0][1]:11,.0f} {row[1][1]:12,.0f}")


def moe_table() -> None:
    from fastsim.cost import CostModel
    from fastsim.engine import cost_nb as nb

    cm = CostModel.create("mistralai/Mixtral-8x7B-v0.1", "H100-SXM", tp=2)
    print("\nMixtral-8x7B, 2 x H100-SXM (TP 2): experts read per layer and decode step time by batch")
    for b in (1, 2, 4, 8, 16, 32, 64, 256):
        active = nb.expected_active_experts_nb(8.0, 2.0, b)
        print(f"  batch {b:4d}: {active:5.2f} of 8 experts, step {cm.forward_time([512] * b).total_s * 1e3:6.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    crossover_table()
    engine_runs(args.requests)
    moe_table()


if __name__ == "__main__":
    main()
