"""fastsim's KV-cache plan against the number of GPU blocks vLLM logged for the same deployment.

`data/kv_cache_blocks.csv` holds what vLLM printed at start-up (each row cites its log) for known
models, GPUs, parallelism and settings; `kv_capacity_table` plans each of them with
fastsim.memory.memory_plan and reports the relative error of the planned num_gpu_blocks.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources

import numpy as np

from fastsim.catalog import load_gpu, load_model
from fastsim.config import Engine
from fastsim.memory import memory_plan


@dataclass(frozen=True)
class KvPoint:
    id: str
    source: str
    vllm_version: str
    model: str
    gpu: str
    engine: Engine
    logged_blocks: int


def load_kv_points() -> list[KvPoint]:
    text = resources.files("fastsim.validation").joinpath("data/kv_cache_blocks.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    points = []
    for r in rows:
        engine = Engine(tensor_parallel_size=int(r["tp"]), pipeline_parallel_size=int(r["pp"]), dtype=r["dtype"],
                        kv_cache_dtype=r["kv_cache_dtype"], gpu_memory_utilization=float(r["gpu_memory_utilization"]),
                        max_num_batched_tokens=int(r["max_num_batched_tokens"]), max_num_seqs=int(r["max_num_seqs"]),
                        block_size=int(r["block_size"]), scheduler=r["scheduler"],
                        enable_chunked_prefill=r["scheduler"] == "v1")
        points.append(KvPoint(r["id"], r["source"], r["vllm_version"], r["model"], r["gpu"], engine,
                              int(r["logged_blocks"])))
    return points


def kv_capacity_table() -> list[dict]:
    """One row per logged point: planned and logged blocks, the relative error, and the plan's terms."""
    out = []
    for p in load_kv_points():
        plan = memory_plan(load_model(p.model), load_gpu(p.gpu), p.engine, check_context=False)
        gib = 2**30
        out.append({"id": p.id, "vllm": p.vllm_version, "model": p.model, "gpu": p.gpu,
                    "tp": p.engine.tensor_parallel_size, "pp": p.engine.pipeline_parallel_size,
                    "logged_blocks": p.logged_blocks, "planned_blocks": plan.num_gpu_blocks,
                    "error": plan.num_gpu_blocks / p.logged_blocks - 1,
                    "weights_gib": plan.weight_bytes / gib, "activation_gib": plan.activation_bytes / gib,
                    "non_torch_gib": plan.non_torch_bytes / gib, "kv_gib": plan.kv_cache_bytes / gib})
    return out


def kv_capacity_markdown(table: list[dict]) -> str:
    """The table as bench/validate.py prints it and docs/validation.md shows it."""
    errors = np.abs([r["error"] for r in table])
    lines = ["| point | vLLM | model | GPU | TP x PP | logged blocks | fastsim | error | weights / activation / "
             "non-torch / KV GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['id']} | {r['vllm']} | {r['model'].split('/')[-1]} | {r['gpu']} | {r['tp']} x {r['pp']} | "
                     f"{r['logged_blocks']:,} | {r['planned_blocks']:,} | {r['error'] * 100:+.1f}% | "
                     f"{r['weights_gib']:.2f} / {r['activation_gib']:.2f} / {r['non_torch_gib']:.2f} / "
                     f"{r['kv_gib']:.2f} |")
    lines.append(f"\n{len(table)} logged figures: median |error| {np.median(errors) * 100:.1f}%, "
                 f"largest {errors.max() * 100:.1f}%")
    return "\n".join(lines)
