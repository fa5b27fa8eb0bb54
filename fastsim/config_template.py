"""`fastsim generate-config`: a commented YAML of every option with its default, from the schema."""
from __future__ import annotations

import yaml
from pydantic import BaseModel

from fastsim import config as C

_POOLS = """\
# A cluster of unlike replicas: pools, each `count` replicas of one GPU and engine settings.
#   pools:
#     - {name: h100, count: 2, gpu: H100-SXM, engine: {tensor_parallel_size: 1}}
#     - {name: a100, count: 4, gpu: A100-SXM-80GB, engine: {tensor_parallel_size: 2, max_num_seqs: 128}}
"""

_WORKLOAD = """\
workload:
  # Give num_requests (split across clients by rate) or duration_s (arrivals until then).
  num_requests: 1000
  # duration_s: 300
  clients:
    - name: chat
      # arrival process: {process: poisson, rate: R} | {process: gamma, rate: R, cv: C} (cv > 1 = bursty)
      #                | {process: constant, rate: R} | {process: batch, at_s: 0} (all at once, offline)
      arrival: {process: poisson, rate: 4.0}
      # (prompt, output) pairs sampled jointly from a built-in dataset (sharegpt | bwb | arxiv) or a
      # file: {file: lengths.csv, prompt_column: prompt_tokens, output_column: output_tokens}
      dataset: {name: sharegpt}
    - name: batch-jobs
      num_requests: 100             # a client's own share instead of a split of num_requests
      arrival: {process: gamma, rate: 1.0, cv: 4.0}
      # Or independent token-count distributions, each with optional min (default 1) and max:
      #   {dist: constant, value: V}        {dist: uniform, low: L, high: H}
      #   {dist: normal, mean: M, std: S}   (truncated to [min, max], not clipped)
      #   {dist: lognormal, mean: M, std: S} (mean and std of the token counts, NOT of their log)
      #   {dist: gamma, mean: M, std: S}    {dist: weibull, shape: K, scale: L}
      #   {dist: pareto, shape: A, scale: XM}
      #   {dist: empirical, dataset: sharegpt, column: prompt_tokens}  (or file: path.csv|.parquet)
      #   {dist: mixture, components: [{weight: 0.7, spec: {...}}, {weight: 0.3, spec: {...}}]}
      prompt_tokens: {dist: lognormal, mean: 1500, std: 1000, max: 7000}
      output_tokens: {dist: uniform, low: 50, high: 400}
"""

_ENGINES = """\
# Variants compared on the identical workload: each a partial override of `engine`, with a name.
# engines:
#   - {name: seqs-128, max_num_seqs: 128}
#   - {name: no-chunking, enable_chunked_prefill: false, max_num_batched_tokens: 8192, max_model_len: 8192}
"""


def _section(name: str, model: type[BaseModel], indent: str = "") -> list[str]:
    lines = [f"{indent}{name}:"]
    for fname, f in model.model_fields.items():
        default = f.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            lines += _section(fname, type(default), indent + "  ")
            continue
        value = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...").strip()
        if value.endswith("..."):
            value = value[:-3].strip()
        doc = f"  # {f.description}" if f.description else ""
        lines.append(f"{indent}  {fname}: {value}{doc}")
        lines += [f"{indent}  #   {line}" for line in _EXAMPLES.get((model, fname), [])]
    return lines


_EXAMPLES = {
    (C.Engine, "speculative_config"): [
        "e.g. {method: eagle, num_speculative_tokens: 4, acceptance_rate: 0.7}",
        "  or {model: Qwen/Qwen2.5-1.5B, num_speculative_tokens: 5, acceptance_probs: [0.8, 0.7, 0.6, 0.5, 0.4]}",
        "  method: ngram | draft_model | eagle | eagle3 | mtp; draft_tensor_parallel_size (default: the target's)"],
}


_SWEEP = """
# `fastsim sweep`: the configurations to run, each parameter a dotted key of this file
# (`fastsim run` ignores this section). mode: grid (every combination) | zip (i-th values together) |
# random (`samples` draws, seeded by `seed`). Values: a list, {start, stop, step} (stop included),
# or, in random mode, {low, high, log: false, integer: false}.
# sweep:
#   mode: grid
#   parameters:
#     workload.clients.0.arrival.rate: {start: 1, stop: 10, step: 1}
#     engine.max_num_seqs: [64, 128, 256]"""


def config_template() -> str:
    out = ["# fastsim configuration: every option with its default. `fastsim run this.yaml`.", ""]
    out += _section("simulation", C.Simulation) + [""]
    out += ["# a catalog id (`fastsim models`) or a path to a Hugging Face config.json",
            f"model: {C.Config.model_fields['model'].default}", ""]
    out += ["# GPU id from `fastsim gpus`, or your own from gpus_file"] + _section("hardware", C.Hardware) + [""]
    out += ["# vLLM engine arguments, same names and meanings"] + _section("engine", C.Engine) + [""]
    out += [_ENGINES] + _section("cluster", C.Cluster) + [_POOLS, _WORKLOAD]
    out += ["# Goodput counts requests meeting every SLO given (vLLM's --goodput)"] + _section("slo", C.Slo) + [""]
    out += _section("output", C.Output) + [_SWEEP]
    return "\n".join(out) + "\n"
