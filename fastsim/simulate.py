"""Orchestration: config -> catalogs -> cost tables + workload arrays -> engine kernel -> tables."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from fastsim.catalog import load_gpu, load_model
from fastsim.catalog.gpus import load_gpu_file
from fastsim.config import Config, Engine, load_config
from fastsim.cost import CostModel
from fastsim.engine import cost_nb
from fastsim.engine import enums as E
from fastsim.engine.replica_nb import run_replica_nb
from fastsim.errors import FastsimError
from fastsim.memory import MemoryPlan, kv_dtype, memory_plan
from fastsim.metrics import itl_stats_from_histogram, request_table, summarize
from fastsim.workload import Workload, generate_workload


@dataclass
class Result:
    """What a run produced: per-request table (all engines), summaries and timelines by engine."""

    requests: pa.Table
    summaries: dict[str, dict]
    timelines: dict[str, pa.Table] = field(default_factory=dict)
    memory: dict[str, MemoryPlan] = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        """The summary of the only engine; with several, {'engines': {name: summary}}."""
        if len(self.summaries) == 1:
            return next(iter(self.summaries.values()))
        return {"engines": self.summaries}

    def to_pandas(self):
        return self.requests.to_pandas()


def measured_mask(workload: Workload, cfg: Config) -> np.ndarray:
    t = workload.arrival_s
    last = t.max() if t.size else 0.0
    return (t >= cfg.simulation.warmup_s) & (t <= last - cfg.simulation.cooldown_s)


def rejections(workload: Workload, engine: Engine, plan: MemoryPlan) -> np.ndarray:
    """Reason code per request: too long for the context, or for the whole KV cache."""
    total = workload.prompt_tokens + workload.output_tokens
    reason = np.zeros(len(workload), np.int8)
    reason[np.ceil(total / engine.block_size) > plan.num_gpu_blocks] = E.REASON_KV
    reason[total > plan.max_model_len] = E.REASON_CONTEXT
    return reason


def validate_engine(engine: Engine, plan: MemoryPlan) -> None:
    if not engine.enable_chunked_prefill and engine.max_num_batched_tokens < plan.max_model_len:
        raise FastsimError(
            f"engine.max_num_batched_tokens = {engine.max_num_batched_tokens} is smaller than max_model_len "
            f"({plan.max_model_len}) with chunked prefill disabled, so long prompts could never be scheduled; "
            "raise it, lower max_model_len, or set enable_chunked_prefill: true (vLLM rejects this too)")


def plan_engines(cfg: Config):
    """Model, GPU and, per engine, its memory plan: everything checked before simulating."""
    model = load_model(cfg.model)
    custom = load_gpu_file(cfg.hardware.gpus_file) if cfg.hardware.gpus_file else None
    gpu = load_gpu(cfg.hardware.gpu, custom)
    if cfg.simulation.mode == "fast":
        raise FastsimError("simulation.mode = 'fast' is not available yet; use mode: exact")
    plans = []
    for eng in cfg.engine_variants():
        if eng.max_model_len and eng.max_model_len > model.max_position_embeddings:
            raise FastsimError(f"engine.max_model_len = {eng.max_model_len} exceeds {model.name}'s context "
                               f"({model.max_position_embeddings}); use at most that")
        plan = memory_plan(model, gpu, eng)
        validate_engine(eng, plan)
        plans.append((eng, plan))
    return model, gpu, plans


def run_polled(kernel, args: tuple, progress: np.ndarray, report, interval_s: float = 0.1):
    """Run a GIL-releasing kernel in a worker thread, calling report() while it runs."""
    out: list = []
    errors: list = []

    def work():
        try:
            out.append(kernel(*args))
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(interval_s)
        report(int(progress[0]))
    if errors:
        raise errors[0]
    return out[0]


def simulate(config: Config | str | Path | None = None, overrides: list[str] | None = None,
             progress=None) -> Result:
    """Run every engine of `config` (a Config, a YAML path, or None for the built-in default)
    on one workload. If given, `progress(stage: str, done: int, total: int)` is called as the
    run advances (done/total: requests finished of those admitted, while simulating)."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    say = progress or (lambda stage, done=0, total=0: None)
    model, gpu, plans = plan_engines(cfg)
    say("generating workload")
    workload = generate_workload(cfg.workload, cfg.simulation.seed)
    measured = measured_mask(workload, cfg)
    tables, summaries, timelines, memory = [], {}, {}, {}
    for eng, plan in plans:
        cm = CostModel.create(model, gpu, tp=eng.tensor_parallel_size, dtype=eng.dtype,
                              profile=cfg.hardware.profile, kv_cache_dtype=kv_dtype(eng))
        cost_tables = cost_nb.build_tables_nb(cm.params, cm.ops, eng.max_num_batched_tokens, eng.max_num_seqs)
        reason = rejections(workload, eng, plan)
        admitted = int((reason == 0).sum())
        counter = np.zeros(1, np.int64)
        args = (workload.arrival_s, workload.prompt_tokens, workload.output_tokens, reason > 0, measured,
                cm.params, *cost_tables, eng.max_num_seqs, eng.max_num_batched_tokens, eng.block_size,
                plan.num_gpu_blocks, eng.enable_chunked_prefill, eng.long_prefill_token_threshold,
                eng.scheduler == "v0", eng.framework_overhead_ms * 1e-3,
                cfg.simulation.max_sim_time_s or np.inf, model.sliding_window or 0, cfg.output.timeline, counter)
        stage = f"simulating {eng.name}"
        wall0 = time.perf_counter()
        out = run_polled(run_replica_nb, args, counter, lambda done: say(stage, done, admitted))
        wall = time.perf_counter() - wall0
        itl_hist, itl_stats, timeline, counters = out[7:]
        table = request_table(eng.name, workload, reason, out)
        extra = {"engine": eng.name, "num_gpu_blocks": plan.num_gpu_blocks,
                 "kv_cache_gb": plan.kv_cache_bytes / 1e9, "kv_cache_tokens": plan.kv_tokens,
                 "peak_kv_blocks_used": int(counters[1]), "iterations": int(counters[0]),
                 "preemptions": int(counters[3]), "simulated_time_s": float(
                     np.nanmax(table.column("finish_s").to_numpy()) if (out[0] == E.FINISHED).any() else 0.0),
                 "wall_time_s": wall}
        summaries[eng.name] = summarize(table, itl_stats_from_histogram(itl_hist, itl_stats),
                                        cfg.simulation, cfg.slo, extra)
        tables.append(table)
        memory[eng.name] = plan
        if cfg.output.timeline:
            timelines[eng.name] = pa.table({name: timeline[:, i] for i, name in enumerate(E.TL_COLUMNS)})
    return Result(pa.concat_tables(tables), summaries, timelines, memory)
