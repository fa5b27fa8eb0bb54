"""Published measurements of real serving systems, replayed through fastsim.

`data/published_points.csv` is the development set (a copy of shared/data/validation, whose README
says how each source ran its benchmark). Each point becomes a fastsim config built the way its
source ran: the engine and its version's defaults, the benchmark's client (a static batch, an
offline dataset, Poisson arrivals) and the figure the source reported, computed from fastsim's
request table as the source's benchmark computes it.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from fastsim.catalog import load_model
from fastsim.config import build_config
from fastsim.simulation import Result, simulate

# Every figure a point may carry that fastsim predicts; the rest of a row (derived throughputs of
# a static batch, TensorRT-LLM's integer-rounded req/s) restates one of these.
LATENCY_METRICS = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "median_itl_ms",
                   "p99_itl_ms", "batch_latency_ms")
THROUGHPUT_METRICS = ("output_tok_s", "req_s")

# The sources, by the CSV's `source` column, under a short key used in tables.
SOURCES = {
    "vLLM project CI (buildkite performance-benchmark)": "vllm_ci",
    "Argonne LLM-Inference-Bench (arXiv 2411.00136)": "argonne",
    "NVIDIA TensorRT-LLM perf overview": "trtllm_offline",
    "NVIDIA TensorRT-LLM perf overview, 'Online Serving Measurements'": "trtllm_online",
}

GPUS = {  # the reports' GPU names -> fastsim's catalog
    "A100-SXM4-80GB": "A100-SXM-80GB", "A100 SXM4 80GB": "A100-SXM-80GB",
    "H100 (8xH100 node)": "H100-SXM", "H100 SXM 80GB": "H100-SXM",
    "H100 80GB HBM3 (SXM; JLSE testbed, per nvidia-smi in repo)": "H100-SXM",
    "H200": "H200-SXM",
}

MODELS = {  # the reports' model names -> fastsim's catalog (an instruct model has its base's shapes)
    "Meta-Llama-3-8B": "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B": "meta-llama/Meta-Llama-3-8B",
    "Meta-Llama-3-70B-Instruct": "meta-llama/Meta-Llama-3-70B",
    "meta-llama/Llama-2-7b-hf": "meta-llama/Llama-2-7b-hf",
    "mistralai/Mistral-7B-v0.1": "mistralai/Mistral-7B-v0.1", "Mistral-7B": "mistralai/Mistral-7B-v0.1",
    "Llama-3.1-8B": "meta-llama/Llama-3.1-8B", "Llama-3.1-70B": "meta-llama/Llama-3.1-70B",
}

# Runs whose result depends on a random draw (which ShareGPT prompts, Poisson gaps) are simulated
# with this many seeds and their figures averaged: the expected value of the benchmark, not one
# draw of it (vLLM CI's 200 ShareGPT prompts move throughput by ~+-30% with which 200).
RANDOM_SEEDS = 64


@dataclass(frozen=True)
class Point:
    """One published measurement: where and how it ran, and the figures it reported."""

    point_id: str
    source: str          # a key of SOURCES' values
    framework: str       # fastsim's: vllm | trtllm
    gpu: str             # catalog id
    model: str           # catalog id
    tp: int
    kind: str            # the CSV's workload_kind
    input_len: int | None
    output_len: int | None
    num_prompts: int | None
    rate: float          # requests/s; inf: all at once
    batch: int | None
    dtype: str           # fp16 | bf16 | fp8
    measured: dict[str, float] = field(default_factory=dict)

    @property
    def random(self) -> bool:
        return self.kind in ("online_poisson", "offline_dataset") and (
            self.kind == "offline_dataset" or math.isfinite(self.rate) or self.input_len is None)


def _num(s: str) -> float | None:
    return float(s) if s not in ("", None) else None


def data_path() -> Path:
    return Path(str(resources.files("fastsim.validation") / "data" / "published_points.csv"))


def load_points(path: str | Path | None = None) -> list[Point]:
    """The development set's points with the figures fastsim can predict."""
    with open(path or data_path(), newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [_point(r) for r in rows]


def _point(r: dict) -> Point:
    source = SOURCES[r["source"]]
    kind = r["workload_kind"]
    framework = "trtllm" if r["system"].startswith("TensorRT-LLM") else "vllm"
    prec = r["precision"]
    dtype = "fp8" if prec.startswith("fp8") else "fp16" if prec.startswith("fp16") else "bf16"
    rate = r["request_rate_qps"].strip().lower()
    measured: dict[str, float] = {}
    if kind == "static_batch_latency":
        measured["batch_latency_ms"] = float(r["e2e_latency_ms_mean"])
    elif kind == "static_batch_prefill":
        measured["batch_latency_ms"] = float(r["mean_ttft_ms"])  # the whole batch's prefill, one token each
    elif kind == "offline_dataset":
        measured["req_s"] = float(r["req_s"])
    elif kind == "offline_fixed":
        measured["output_tok_s"] = float(r["output_tok_s"])
    else:
        for name in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms"):
            if _num(r[name]) is not None:
                measured[name] = float(r[name])
        if source == "trtllm_online":
            measured["output_tok_s"] = float(r["output_tok_s"])  # (its req/s is rounded to integers)
        elif _num(r["req_s"]) is not None:
            measured["req_s"] = float(r["req_s"])
    ints = {k: (int(float(r[k])) if _num(r[k]) is not None else None)
            for k in ("input_len", "output_len", "num_prompts", "batch_or_concurrency")}
    return Point(r["point_id"], source, framework, GPUS[r["gpu"]], MODELS[r["model"]], int(r["tp"]), kind,
                 ints["input_len"], ints["output_len"], ints["num_prompts"],
                 math.inf if rate in ("", "inf") else float(rate), ints["batch_or_concurrency"], dtype, measured)


def _engine(p: Point, max_model_len: int | None) -> dict:
    """The engine as the source ran it."""
    eng: dict = {"framework": p.framework, "tensor_parallel_size": p.tp}
    if p.source == "vllm_ci":
        # Late-2024 main in CI: bf16, chunked prefill within 8192 tokens (the data set's README).
        eng |= {"dtype": "bf16", "max_num_seqs": 256, "max_num_batched_tokens": 8192}
    elif p.source == "argonne" and p.framework == "vllm":
        # Mid-2024 vLLM (V0): whole prefills first, a token budget of max(max_model_len, 2048), where
        # max_model_len is the model's context.
        context = load_model(p.model).max_position_embeddings
        eng |= {"dtype": p.dtype, "scheduler": "v0", "enable_chunked_prefill": False, "max_num_seqs": 256,
                "max_num_batched_tokens": max(context, 2048)}
    elif p.source == "argonne":
        # Mid-2024 trtllm-build defaults: max_batch_size 256, max_num_tokens 8192; fp16 as the report ran.
        eng |= {"dtype": "fp16", "kv_cache_dtype": "fp16", "max_num_seqs": 256, "max_num_batched_tokens": 8192,
                "max_model_len": max_model_len}
    elif p.source == "trtllm_offline":
        # trtllm-bench's limits (max_batch_size 2048, max_num_tokens 8192, the framework's defaults),
        # the KV cache at kv_cache_free_gpu_mem_fraction 0.95, FP8 weights and KV on Hopper, FP16 on A100.
        eng |= {"kv_cache_free_gpu_mem_fraction": 0.95, "max_model_len": max_model_len}
        if p.dtype != "fp8":
            eng |= {"dtype": p.dtype, "kv_cache_dtype": p.dtype}
    else:  # trtllm_online: Triton's tensorrtllm_backend in BF16
        eng |= {"dtype": "bf16", "kv_cache_dtype": "bf16", "max_model_len": max_model_len}
    return eng


def point_config(p: Point, seed: int = 0) -> dict:
    """The raw fastsim config that replays point `p` (validated by the caller)."""
    fixed = p.input_len is not None and p.output_len is not None
    max_len = p.input_len + p.output_len if fixed else None
    if p.kind in ("static_batch_latency", "static_batch_prefill"):
        n, arrival = p.batch, {"process": "batch"}
    elif p.kind in ("offline_dataset", "offline_fixed"):
        n, arrival = p.num_prompts or _TRTLLM_BENCH_REQUESTS[(p.input_len, p.output_len)], {"process": "batch"}
    else:
        n = p.num_prompts
        arrival = {"process": "batch"} if math.isinf(p.rate) else {"process": "poisson", "rate": p.rate}
        if p.source == "vllm_ci" and "process" in arrival and arrival["process"] == "poisson":
            # Late-2024 benchmark_serving.py at its default --seed 0: the same send times, not a fresh draw
            # (200 Poisson gaps spread the run's length, so its req/s, by +-7%).
            arrival |= {"schedule": "vllm_bench_legacy", "seed": 0}
    client: dict = {"name": p.kind, "arrival": arrival}
    if fixed:
        client |= {"prompt_tokens": {"dist": "constant", "value": p.input_len},
                   "output_tokens": {"dist": "constant", "value": p.output_len}}
    else:
        client |= {"dataset": {"name": "sharegpt_vllm"}}
    return {"simulation": {"seed": seed, "mode": "fast"}, "model": p.model, "hardware": {"gpu": p.gpu},
            "engine": _engine(p, max_len), "workload": {"num_requests": n, "clients": [client]}}


# trtllm-bench's request counts per (ISL, OSL) in NVIDIA's offline table (the data set's README).
_TRTLLM_BENCH_REQUESTS = {(128, 128): 30000, (128, 2048): 3000, (128, 4096): 1500, (500, 2000): 3000,
                          (1000, 1000): 3000, (2048, 128): 3000, (2048, 2048): 1500, (5000, 500): 1500,
                          (20000, 2000): 1000}


def figures(p: Point, result: Result) -> dict[str, float]:
    """The point's figures from a run, computed as its source's benchmark computes them."""
    t = result.requests
    arrival = t.column("arrival_s").to_numpy()
    finish = t.column("finish_s").to_numpy()
    out_tokens = float(np.nansum(t.column("generated_tokens").to_numpy()))
    # Benchmarks time from the first request sent to the last one done.
    duration = float(np.nanmax(finish) - np.nanmin(arrival))
    s = result.summary
    out = {}
    for name in p.measured:
        if name == "batch_latency_ms":
            out[name] = duration * 1e3
        elif name == "req_s":
            out[name] = len(t) / duration
        elif name == "output_tok_s":
            out[name] = out_tokens / duration
        else:
            out[name] = float(s[name])
    return out


def predict(p: Point, seeds: int = RANDOM_SEEDS) -> dict[str, float]:
    """fastsim's figures for point `p`, averaged over `seeds` draws where the run is random."""
    runs = [figures(p, simulate(build_config(point_config(p, seed)))) for seed in range(seeds if p.random else 1)]
    return {name: float(np.mean([r[name] for r in runs])) for name in p.measured}


@dataclass(frozen=True)
class Row:
    """One metric of one point: measured, predicted, and the relative error."""

    point: Point
    metric: str
    measured: float
    predicted: float

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1.0

    @property
    def metric_class(self) -> str:
        m = self.metric
        return ("ttft" if "ttft" in m else "itl" if "itl" in m else "throughput" if m in THROUGHPUT_METRICS
                else "latency")


def validate(points: list[Point] | None = None, seeds: int = RANDOM_SEEDS, progress=None) -> list[Row]:
    """Every metric of every point, measured against predicted."""
    rows = []
    points = load_points() if points is None else points
    for i, p in enumerate(points):
        got = predict(p, seeds)
        rows += [Row(p, name, value, got[name]) for name, value in p.measured.items()]
        if progress is not None:
            progress(i + 1, len(points))
    return rows
