"""One run of a config: plan it (planning), make the workload, run each engine's pools through the
kernel (kernel_run; disaggregation for split pools), and turn the arrays into the request table, the
summary and the timeline (metrics)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsim.config import Batch, ClosedLoop, Config, Engine, load_config
from fastsim.cost.serving import engine_serving
from fastsim.disaggregation import run_disaggregated
from fastsim.engine import enums as E
from fastsim.engine.bundles import KernelOut
from fastsim.engine import kernels_compiled
from fastsim.kernel_run import WallBudget, measured_mask, run_pools
from fastsim.metrics import itl_stats_from_histogram, load_report, request_table, summarize
from fastsim.planning import ReplicaPlan, check_memory, check_requests, plan_engines, router_for
from fastsim.workload import Workload, generate_workload


@dataclass
class Result:
    """What a run produced: per-request table (all engines), summaries and timelines by engine."""

    requests: pa.Table
    summaries: dict[str, dict]
    timelines: dict[str, pa.Table] = field(default_factory=dict)
    pools: dict[str, list[ReplicaPlan]] = field(default_factory=dict)  # per engine: replicas and memory
    warnings: list[str] = field(default_factory=list)  # what a user should read beside the figures

    @property
    def summary(self) -> dict:
        """The summary of the only engine; with several, {'engines': {name: summary}}."""
        if len(self.summaries) == 1:
            return next(iter(self.summaries.values()))
        return {"engines": self.summaries}

    def to_pandas(self):
        return self.requests.to_pandas()
COMPILING = "compiling simulation kernels (first run only)"


# Whether this process has looked for the compiled kernels already (a sweep's points need not each
# read the cache folder again).
_kernels_checked = False


def warm_up() -> float:
    """Compile the engine's kernels into the cache, or load them from it: a 16-request run of the
    built-in default scenario (one compiled entry point serves every mode, framework and
    parallelism). Returns the seconds it took."""
    global _kernels_checked
    _kernels_checked = True  # (this run is the one that compiles them)
    t0 = time.perf_counter()
    simulate(load_config(None, ["workload.num_requests=16"]))
    return time.perf_counter() - t0


def simulate(config: Config | str | Path | dict | None = None, overrides: list[str] | None = None,
             progress=None) -> Result:
    """Run every engine of `config` (a Config, a YAML path, a config's mapping as a dict, or None
    for the built-in default)
    on one workload. If given, `progress(stage: str, done: int, total: int)` is called as the
    run advances (done/total: requests finished of those admitted, while simulating)."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    say = progress or (lambda stage, done=0, total=0: None)
    model, gpu, plans = plan_engines(cfg)
    check_memory(cfg, len(plans))
    global _kernels_checked
    if not _kernels_checked:
        if not kernels_compiled():
            say(COMPILING)  # its own stage: minutes a user would otherwise see as "generating workload"
            warm_up()
        _kernels_checked = True
    say("generating workload")
    workload = generate_workload(cfg.workload, cfg.simulation.seed)
    measured = measured_mask(workload, cfg)
    tables, summaries, timelines, pool_plans = [], {}, {}, {}
    limit = cfg.simulation.max_wall_time_s
    deadline = time.monotonic() + limit if limit is not None else float("inf")
    online = online_mask(workload, cfg)
    open_loop = np.array([c.conversation is None and not isinstance(c.arrival, (Batch, ClosedLoop))
                          for c in cfg.workload.clients], dtype=bool)[workload.client]
    reasons, notes = check_requests(plans, workload)
    for (eng, pools), reason in zip(plans, reasons):
        budget = WallBudget(deadline)
        api_s = engine_serving(eng).api_server_latency_ms * 1e-3
        engine_view = answered_through_api_server(workload, online, api_s)
        stage = f"simulating {eng.name}"
        report = (lambda done, stage=stage, admitted=int((reason == 0).sum()): say(stage, done, admitted))
        if cfg.cluster.disaggregation is not None:
            out, extra = run_disaggregated(cfg, model, pools, engine_view, measured, reason, report, budget)
        else:
            out, extra = run_pools(cfg, model, pools, engine_view, measured, reason > 0, report,
                                   router=router_for(cfg, eng), budget=budget), {}
        wall = budget.kernel_s
        if api_s > 0:
            out = through_api_server(out, online, api_s)
        if extra:  # disaggregation's parts of each request's time, the API server's among them
            extra["api_server_ms"] = np.where(online, api_s * 1e3, 0.0)
        table = request_table(eng.name, workload, reason, out)
        for name, column in extra.items():  # disaggregation: where each request's time went
            table = table.append_column(name, pa.array(column))
        summaries[eng.name] = summarize(table, itl_stats_from_histogram(out.itl_hist, out.itl_stats), cfg.simulation,
                                        cfg.slo, cluster_summary(eng, pools, out.per_replica, table, wall))
        summaries[eng.name] |= load_report(table, open_loop)
        if summaries[eng.name].get("overloaded"):
            r = summaries[eng.name]
            notes.append(f"{eng.name}: overloaded: requests came at {r['offered_request_rate']:.3g} req/s and were "
                         f"served at about {r['served_request_rate']:.3g} req/s; the last tenth waited "
                         f"{r['late_queue_ms'] / 1e3:,.1f} s in the queue, so the figures describe a growing backlog, "
                         "not a steady state: lower the rate or add capacity (fastsim capacity finds the rate "
                         "it sustains)")
        summaries[eng.name]["stopped_by_wall_time_budget"] = budget.hit
        # Nothing limited the run, yet requests never ended: the engine found no way forward for
        # them (none is known; the fuzz tests check for it). Said, not hidden.
        limited = budget.hit or cfg.simulation.max_sim_time_s is not None
        summaries[eng.name]["stalled_requests"] = 0 if limited else summaries[eng.name]["unfinished"]
        tables.append(table)
        pool_plans[eng.name] = pools
        if cfg.output.timeline:
            timelines[eng.name] = pa.table({name: out.timeline[:, i] for i, name in enumerate(E.TL_COLUMNS)})
    return Result(pa.concat_tables(tables), summaries, timelines, pool_plans, notes)


def online_mask(workload: Workload, cfg: Config) -> np.ndarray:
    """Which requests come through the API server: their client's `online`, by default all but
    batch (offline) clients'."""
    online = np.array([c.online if c.online is not None else not isinstance(c.arrival, Batch)
                       for c in cfg.workload.clients], dtype=bool)
    return online[workload.client]


def answered_through_api_server(workload: Workload, online: np.ndarray, api_s: float) -> Workload:
    """The workload as the engine sees it: an online client's next request (a conversation's next
    turn, a closed loop's next request) leaves the client when it has its answer, api_s after the
    engine finished the last (response path, then its own request path), so the engine sees it
    think time + api_s after that finish."""
    if api_s == 0 or not (workload.think_s >= 0).any():
        return workload
    return replace(workload, think_s=np.where(online & (workload.think_s >= 0), workload.think_s + api_s,
                                              workload.think_s))


def through_api_server(out: KernelOut, online: np.ndarray, api_s: float) -> KernelOut:
    """The kernel's output with online requests' first token and finish seen api_s later: the API
    server's request path (parsing, tokenizing) and response path (detokenizing, streaming) add a
    near-constant latency outside the engine. The engine sees the request on arrival (the
    difference is a few ms of queueing order)."""
    first_tok, finish = out.first_token_s.copy(), out.finish_s.copy()
    first_tok[online] += api_s
    finish[online] += api_s
    return out._replace(first_token_s=first_tok, finish_s=finish)


def cluster_summary(eng: Engine, pools: list[ReplicaPlan], stats: np.ndarray, table: pa.Table, wall: float) -> dict:
    """fastsim's own figures: memory, iterations, preemptions, per replica and in total."""
    finished = table.column("finish_s").to_numpy()
    sim_s = float(np.nanmax(finished)) if np.isfinite(finished).any() else 0.0
    replicas = []
    for rp in pools:
        for _ in range(rp.count):
            c = stats[len(replicas)]
            compute_s, comm_s = float(c["compute_time_s"]), float(c["comm_time_s"])
            # Each GPU of a replica is busy for the forward passes of its pipeline stage.
            util = min((compute_s + comm_s) / rp.engine.pipeline_parallel_size / sim_s, 1.0) if sim_s > 0 else 0.0
            replicas.append({"replica": len(replicas), "pool": rp.pool, "gpu": rp.gpu.name,
                             "tensor_parallel_size": rp.engine.tensor_parallel_size,
                             "pipeline_parallel_size": rp.engine.pipeline_parallel_size,
                             "num_gpu_blocks": rp.memory.num_gpu_blocks, "requests": int(c["requests"]),
                             "iterations": int(c["iterations"]), "preemptions": int(c["preemptions"]),
                             "peak_kv_blocks_used": int(c["peak_kv_blocks_used"]),
                             # Held by requests still running when the run ended (cached blocks count as free).
                             "kv_blocks_in_use_at_end": rp.memory.num_gpu_blocks - int(c["free_blocks_at_end"]),
                             "compute_time_s": compute_s, "comm_time_s": comm_s, "num_gpus": rp.gpus_per_replica,
                             "gpu_utilization": util, "power_w": rp.gpu.power_w(util)})
    # None unless every GPU of the deployment has a price (catalog or hardware.prices_usd_per_hour).
    cost = (sum(rp.count * rp.gpus_per_replica * rp.gpu.price_usd_per_hour for rp in pools)
            if all(rp.gpu.price_usd_per_hour for rp in pools) else None)
    return {"engine": eng.name, "num_replicas": len(replicas),
            "num_gpus": sum(r["num_gpus"] for r in replicas),
            "num_gpu_blocks": sum(r["num_gpu_blocks"] for r in replicas),
            "cost_usd_per_hour": cost,
            "kv_cache_gb": sum(rp.count * rp.memory.kv_cache_bytes for rp in pools) / 1e9,
            "kv_cache_tokens": sum(rp.count * rp.memory.kv_tokens for rp in pools),
            "peak_kv_blocks_used": max(r["peak_kv_blocks_used"] for r in replicas),
            "iterations": int(stats["iterations"].sum()), "preemptions": int(stats["preemptions"].sum()),
            "decode_stretch_iterations": int(stats["stretched_iterations"].sum()),
            "closed_form_iterations": int(stats["closed_form_iterations"].sum()),  # fast mode's (of the stretches)
            "prefix_cache_evictions": int(stats["prefix_cache_evictions"].sum()),
            # Forward-pass time summed over iterations (and stages): TP communication apart.
            "compute_time_s": float(stats["compute_time_s"].sum()), "comm_time_s": float(stats["comm_time_s"].sum()),
            "simulated_time_s": sim_s,
            **energy_and_cost(replicas, sim_s, cost, int(pc.sum(table.column("generated_tokens")).as_py() or 0),
                              int(pc.sum(pc.equal(table.column("status"), "finished")).as_py() or 0)),
            "wall_time_s": wall, "replicas": replicas}


def energy_and_cost(replicas: list[dict], sim_s: float, cost_usd_per_hour: float | None, output_tokens: int,
                    finished: int) -> dict:
    """Power, energy and $ over the whole simulated run (every GPU rented and powered from time 0 to
    the last finish), from each replica's GPU count, utilization and power per GPU
    (fastsim.catalog.GpuSpec.power_w). Figures are None where the catalog lacks TDP or price."""
    gpus = sum(r["num_gpus"] for r in replicas)
    busy_gpu_s = sum(r["num_gpus"] * r["gpu_utilization"] * sim_s for r in replicas)
    power_ok = sim_s > 0 and all(r["power_w"] is not None for r in replicas)
    energy_j = sum(r["num_gpus"] * r["power_w"] * sim_s for r in replicas) if power_ok else 0.0
    usd = cost_usd_per_hour * sim_s / 3600.0 if cost_usd_per_hour is not None else None
    return {
        "gpu_utilization": busy_gpu_s / (gpus * sim_s) if sim_s > 0 and gpus else 0.0,
        "mean_power_w": energy_j / (gpus * sim_s) if power_ok else None,
        "energy_j": energy_j if power_ok else None,
        "energy_per_request_j": energy_j / finished if power_ok and finished else None,
        "energy_per_1k_output_tokens_j": 1000.0 * energy_j / output_tokens if power_ok and output_tokens else None,
        "usd_per_1m_output_tokens": 1e6 * usd / output_tokens if usd is not None and output_tokens else None,
    }
