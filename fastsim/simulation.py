"""Orchestration: config -> catalogs -> cost tables + workload arrays -> engine kernel -> tables."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pydantic import ValidationError

from fastsim.catalog import GpuSpec, ModelSpec, load_gpu, load_model
from fastsim.catalog.gpus import load_gpu_file
from fastsim.config import Batch, ClosedLoop, Config, Engine, Pool, format_validation_error, load_config
from fastsim.cost import CostModel
from fastsim.cost.profile import load_profile
from fastsim.cost.serving import engine_serving
from fastsim.cost.speculative import speculative_cost_model
from fastsim.engine import cost_nb as nb
from fastsim.engine import enums as E
from fastsim.engine import prefix_nb as px
from fastsim.engine import kernels_compiled
from fastsim.engine.cluster_nb import run_cluster_nb
from fastsim.errors import FastsimError
from fastsim.memory import MemoryPlan, kv_dtype, memory_plan, stage_layers
from fastsim.metrics import itl_stats_from_histogram, load_report, request_table, summarize
from fastsim.workload import Workload, generate_workload


def measured_mask(workload: Workload, cfg: Config) -> np.ndarray:
    t = workload.arrival_s
    last = t.max() if t.size else 0.0
    return (t >= cfg.simulation.warmup_s) & (t <= last - cfg.simulation.cooldown_s)


@dataclass(frozen=True)
class ReplicaPlan:
    """One pool of identical replicas: where they run, how they are configured, their memory."""

    pool: str
    count: int
    gpu: GpuSpec
    engine: Engine
    memory: MemoryPlan

    @property
    def gpus_per_replica(self) -> int:
        return self.engine.tensor_parallel_size * self.engine.pipeline_parallel_size


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


def rejections(workload: Workload, pools: list[ReplicaPlan]) -> np.ndarray:
    """Reason code per request: too long for the context, or for a replica's whole KV cache.
    A request is checked against the most constrained pool, since the router may send it anywhere."""
    total = workload.prompt_tokens + workload.output_tokens
    reason = np.zeros(len(workload), np.int8)
    # SGLang admits a request only while its tokens fit strictly inside the free room.
    kv_tokens = min(rp.memory.num_gpu_blocks * rp.engine.block_size - (rp.engine.framework == "sglang")
                    for rp in pools)
    max_len = min(rp.memory.max_model_len for rp in pools)
    reason[total > kv_tokens] = E.REASON_KV
    reason[total > max_len] = E.REASON_CONTEXT
    return reason


def rejection_note(engine: str, workload: Workload, reason: np.ndarray, pools: list[ReplicaPlan]) -> str | None:
    """One line on the requests no replica of `engine` can serve, with the numbers that show why."""
    n = int((reason > 0).sum())
    if n == 0:
        return None
    total = workload.prompt_tokens + workload.output_tokens
    parts = []
    for code, limit, fix in ((E.REASON_CONTEXT, min(rp.memory.max_model_len for rp in pools),
                              "raise engine.max_model_len (up to the model's context) or shorten them"),
                             (E.REASON_KV, min(rp.memory.kv_tokens for rp in pools),
                              "give the KV cache more room (gpu_memory_utilization, a larger TP) or shorten them")):
        hit = reason == code
        if hit.any():
            low, high = int(total[hit].min()), int(total[hit].max())
            parts.append(f"{int(hit.sum()):,} {E.REASON_NAMES[code]} ({limit:,} tokens; they need "
                         f"{low:,}{f'-{high:,}' if high > low else ''} tokens of prompt + output): {fix}")
    head = (f"all {n:,} requests would be rejected, nothing to simulate" if n == len(workload) else
            f"{n:,} of {len(workload):,} requests are rejected")
    return f"{engine}: {head}: " + "; ".join(parts)


def validate_engine(engine: Engine, plan: MemoryPlan) -> None:
    whole = not engine.enable_chunked_prefill or engine.scheduler == "v0"
    if whole and engine.max_num_batched_tokens < plan.max_model_len:
        why = "with chunked prefill disabled" if engine.scheduler == "v1" else "under scheduler v0 (whole prefills)"
        raise FastsimError(
            f"engine.max_num_batched_tokens = {engine.max_num_batched_tokens} is smaller than max_model_len "
            f"({plan.max_model_len}) {why}, so long prompts could never be scheduled; raise it, lower "
            "max_model_len, or use scheduler v1 with enable_chunked_prefill: true (vLLM rejects this too)")


def _pools(cfg: Config, engine: Engine, model: ModelSpec, default_gpu: GpuSpec, custom) -> list[ReplicaPlan]:
    dis = cfg.cluster.disaggregation
    if dis is not None:
        pools = [dis.prefill.model_copy(update={"name": dis.prefill.name or "prefill"}),
                 dis.decode.model_copy(update={"name": dis.decode.name or "decode"})]
    else:
        pools = cfg.cluster.pools or [Pool(name=engine.name, count=engine.data_parallel_size)]
    out = []
    for j, pool in enumerate(pools):
        where = (f"cluster.disaggregation.{('prefill', 'decode')[j]}" if dis is not None
                 else f"cluster.pools.{j}" if cfg.cluster.pools else "engine")
        try:
            eng = Engine(**(engine.model_dump(exclude_unset=True) | pool.engine))
        except ValidationError as e:
            raise FastsimError(format_validation_error(e, prefix=f"{where}.engine")) from None
        gpu = _gpu(cfg, pool.gpu, custom) if pool.gpu else default_gpu
        eng = _framework_dtypes(eng, gpu)
        if eng.disable_sliding_window and model.sliding_window and eng.framework != "trtllm":
            # vLLM then caps the context at the window (tests/prefix_caching/test_disable_sliding_window.py).
            cap = min(eng.max_model_len or model.max_position_embeddings, model.sliding_window)
            eng = eng.model_copy(update={"max_model_len": cap})
        if eng.max_model_len and eng.max_model_len > model.max_position_embeddings:
            raise FastsimError(f"{where}.max_model_len = {eng.max_model_len} exceeds {model.name}'s context "
                               f"({model.max_position_embeddings}); use at most that")
        if eng.enable_prefix_caching and eng.scheduler == "v0":
            raise FastsimError(f"{where}.enable_prefix_caching is modelled for scheduler v1 only; "
                               "use scheduler: v1 or turn prefix caching off")
        if dis is not None and eng.framework == "sglang":
            raise FastsimError(f"{where}: disaggregation is modelled for vLLM, TensorRT-LLM and Dynamo engines; "
                               "drop framework sglang")
        if dis is not None and j == 1 and eng.enable_prefix_caching:
            # Dynamo routes by the prefill workers' caches; a decode worker's cache is not modelled.
            if eng.framework != "dynamo" or pool.engine.get("enable_prefix_caching"):
                raise FastsimError(f"{where}.enable_prefix_caching: prefix caching in the decode pool is not "
                                   "modelled (the prefill pool may cache); drop it there")
            eng = eng.model_copy(update={"enable_prefix_caching": False})
        plan = memory_plan(model, gpu, eng)
        validate_engine(eng, plan)
        out.append(ReplicaPlan(pool.name or f"pool{j}", pool.count, gpu, eng, plan))
    return out


def _framework_dtypes(eng: Engine, gpu: GpuSpec) -> Engine:
    """TensorRT-LLM serves FP8 weights and KV cache where the GPU has FP8 (NVIDIA's published
    throughput runs do), unless the config says otherwise."""
    if eng.framework != "trtllm" or not gpu.fp8_tflops:
        return eng
    update = {k: "fp8" for k in ("dtype", "kv_cache_dtype") if k not in eng.model_fields_set}
    return eng.model_copy(update=update)


def _gpu(cfg: Config, name: str, custom) -> GpuSpec:
    """A catalog GPU with the config's own price, if it gives one."""
    gpu = load_gpu(name, custom)
    price = cfg.hardware.prices_usd_per_hour.get(name)
    return gpu if price is None else gpu.model_copy(update={"price_usd_per_hour": price})


def plan_engines(cfg: Config):
    """Model, GPU and, per engine variant, its replica pools with memory plans: everything that
    can be checked before simulating."""
    model = load_model(cfg.model)
    custom = load_gpu_file(cfg.hardware.gpus_file) if cfg.hardware.gpus_file else None
    gpu = _gpu(cfg, cfg.hardware.gpu, custom)
    plans = [(eng, _pools(cfg, eng, model, gpu, custom)) for eng in cfg.engine_variants()]
    if cfg.cluster.disaggregation is not None and any(c.conversation or isinstance(c.arrival, ClosedLoop)
                                                      for c in cfg.workload.clients):
        raise FastsimError("cluster.disaggregation: multi-turn conversations and closed loops are not modelled "
                           "with it yet (an arrival then depends on the decode pool); drop "
                           "workload.clients[].conversation or arrival closed_loop")
    for eng, pools in plans:
        if router_for(cfg, eng) == "prefix_aware" and not any(rp.engine.enable_prefix_caching for rp in pools):
            raise FastsimError(f"cluster.router = 'prefix_aware' routes by what replicas cache, but engine "
                               f"{eng.name!r} has enable_prefix_caching off everywhere; turn it on or pick "
                               "another router")
    return model, gpu, plans


# Peak memory of a run, measured with bench/speed.py: ~650 MB at 1M requests, ~3 GB at 10M (request
# arrays, engine state, the output table); this allows for the worst of those plus a table per engine.
BYTES_PER_REQUEST = 400
BYTES_PER_REQUEST_PER_ENGINE = 200
BASE_BYTES = 300e6


def expected_requests(cfg: Config) -> int | None:
    """Requests the workload will hold, from the config alone (None: a trace decides)."""
    w = cfg.workload
    if w.num_requests is not None:
        return w.num_requests
    total = 0.0
    for c in w.clients:
        if c.num_requests:
            total += c.num_requests
        elif c.trace is not None or c.arrival is None or not hasattr(c.arrival, "rate"):
            return None
        else:
            total += c.arrival.rate * w.duration_s
    return int(total)


def available_memory_bytes() -> float | None:
    """Linux's MemAvailable; elsewhere the machine's physical memory (an upper bound)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: Config, engines: int) -> None:
    """Refuse, before generating anything, a run whose arrays would not fit this machine's memory."""
    n = expected_requests(cfg)
    avail = available_memory_bytes()
    if n is None or avail is None:
        return
    need = BASE_BYTES + n * (BYTES_PER_REQUEST + engines * BYTES_PER_REQUEST_PER_ENGINE)
    if need > avail:
        key = "workload.num_requests" if cfg.workload.num_requests is not None else "workload.duration_s"
        raise FastsimError(
            f"{key}: {n:,} requests{f' x {engines} engines' if engines > 1 else ''} need about {need / 1e9:.1f} GB "
            f"of memory (~{BYTES_PER_REQUEST + engines * BYTES_PER_REQUEST_PER_ENGINE} bytes per request) but "
            f"{avail / 1e9:.1f} GB is available; lower {key}, or split the run into several with other seeds")


def router_for(cfg: Config, engine: Engine, given: str | None = None) -> str:
    """The router a run uses: the one given (a disaggregated pool's), else cluster.router, whose
    default under framework dynamo is Dynamo's KV-aware router."""
    if given:
        return given
    if engine.framework == "dynamo" and "router" not in cfg.cluster.model_fields_set:
        return "kv_aware"
    return cfg.cluster.router


def replica_arrays(model: ModelSpec, pools: list[ReplicaPlan], profile):
    """Per-replica integer settings and cost parameters, and every pool's cost tables concatenated."""
    rows_int, rows_p, tok_parts, seq_parts = [], [], [], []
    tok_off = seq_off = 0
    for rp in pools:
        eng = rp.engine
        serving = engine_serving(eng)
        cm = CostModel.create(model, rp.gpu, tp=eng.tensor_parallel_size, dtype=eng.dtype,
                              profile=serving.kernels(load_profile(profile, rp.gpu), rp.gpu), kv_cache_dtype=kv_dtype(eng),
                              layers=stage_layers(model, eng.pipeline_parallel_size),
                              enable_expert_parallel=eng.enable_expert_parallel, dp=eng.data_parallel_size,
                              expert_routing_skew=eng.expert_routing_skew)
        params, tok, seq = speculative_cost_model(cm, eng.speculative_config, eng.max_num_seqs,
                                                  eng.max_num_batched_tokens, serving.overhead_ms * 1e-3,
                                                  serving.per_seq_us * 1e-6, serving.per_token_us * 1e-6)
        params[nb.CPU_OVERLAP] = eng.async_scheduling
        ints = np.zeros(E.N_RI, np.int64)
        ints[E.RI_MAX_SEQS] = eng.max_num_seqs
        ints[E.RI_MAX_TOKENS] = eng.max_num_batched_tokens
        ints[E.RI_BLOCK_SIZE] = eng.block_size  # a power of two (the config's choices): the kernels shift by it
        ints[E.RI_NUM_BLOCKS] = rp.memory.num_gpu_blocks
        ints[E.RI_CHUNKED] = eng.enable_chunked_prefill
        ints[E.RI_THRESHOLD] = eng.long_prefill_token_threshold
        ints[E.RI_V0] = eng.scheduler == "v0"
        ints[E.RI_SCHED_STEPS] = eng.num_scheduler_steps
        ints[E.RI_STAGES] = eng.pipeline_parallel_size
        ints[E.RI_WINDOW] = (model.sliding_window or 0) if serving.uses_sliding_window else 0
        ints[E.RI_TOK_OFF] = tok_off
        ints[E.RI_SEQ_OFF] = seq_off
        ints[E.RI_APC] = eng.enable_prefix_caching
        ints[E.RI_SGLANG] = eng.framework == "sglang"
        ints[E.RI_LPM] = eng.schedule_policy == "lpm"
        ints[E.RI_NO_EVICT] = eng.capacity_scheduler_policy == "guaranteed_no_evict"
        tok_parts.append(tok)
        seq_parts.append(seq)
        tok_off += tok.shape[1]
        seq_off += seq.shape[1]
        rows_int += [ints] * rp.count
        rows_p += [params] * rp.count
    return (np.array(rows_int), np.array(rows_p), np.concatenate(tok_parts, axis=1),
            np.concatenate(seq_parts, axis=1))


def prefix_cache_arrays(rep_int: np.ndarray, workload: Workload, defer: bool = True) -> tuple:
    """The `apc` tuple run_cluster_nb takes: room for the blocks and hash tables of the replicas
    that enable prefix caching (a token of it for the others), the requests' block identities, and how
    many of their tokens another request may share while they run (a copy of its own: a preemption
    changes it) and once they have finished. defer=False names every shareable block as it fills
    (the tests' reference for the deferred naming of conversation turns' blocks)."""
    n_rep = rep_int.shape[0]
    rep = np.zeros((n_rep, px.N_REP_COLS), np.int64)
    blk = int(rep_int[rep_int[:, E.RI_APC] != 0, E.RI_NUM_BLOCKS].sum())
    base = ht = 0
    for r in range(n_rep):
        rep[r, px.SOURCE_TOKENS] = workload.block_tokens
        if rep_int[r, E.RI_APC]:
            rep[r, px.BLK_BASE] = base
            rep[r, px.EXT_BASE] = blk + base  # its extents' nodes, after every replica's blocks
            rep[r, px.HT_BASE] = ht
            size = 1 << int(2 * rep_int[r, E.RI_NUM_BLOCKS] + 1).bit_length()  # load factor < 1/2
            rep[r, px.HT_SIZE] = size
            base += rep_int[r, E.RI_NUM_BLOCKS]
            ht += size
    seqs = int(rep_int[:, E.RI_MAX_SEQS].max()) if blk else 1
    # A block table holds the longest request's blocks (not max_model_len's: rows cost memory).
    longest = int((workload.prompt_tokens + workload.output_tokens).max()) if len(workload) else 1
    width = -(-longest // int(rep_int[:, E.RI_BLOCK_SIZE].min())) if blk else 1
    pool = np.full((px.N_POOL_ROWS, max(2 * blk, 1)), px.EMPTY, np.int64)
    table = np.full((2, max(ht, 1)), px.EMPTY, np.int64)
    slots = np.full((n_rep, px.N_SLOT_COLS, seqs), px.EMPTY, np.int64)
    rows = np.full((n_rep if blk else 1, seqs, width), px.EMPTY, np.int64)
    free_rows = np.zeros((n_rep, seqs), np.int64)
    content = workload.content()
    shareable = px.shareable_tokens(content, workload.block_tokens) if blk else np.zeros(len(workload), np.int64)
    running = px.running_shareable_tokens(content, shareable, workload.session, workload.output_tokens) \
        if blk and defer else shareable.copy()
    return (pool, table, rep, slots, content + (running, shareable), rows, free_rows)


def route_params(cfg: Config) -> np.ndarray:
    out = np.zeros(E.N_RP)
    out[E.RP_CACHE_THRESHOLD] = cfg.cluster.cache_threshold
    out[E.RP_BALANCE_ABS] = cfg.cluster.balance_abs_threshold
    out[E.RP_BALANCE_REL] = cfg.cluster.balance_rel_threshold
    out[E.RP_OVERLAP_WEIGHT] = cfg.cluster.kv_overlap_score_weight
    return out


@dataclass
class WallBudget:
    """simulation.max_wall_time_s: the time.monotonic() at which runs stop, and whether one did;
    and the seconds the kernels ran (an engine's `wall_time_s`)."""

    deadline: float = float("inf")
    hit: bool = False
    kernel_s: float = 0.0


def run_polled(kernel, args: tuple, progress: np.ndarray, report, interval_s: float = 0.1,
               budget: WallBudget | None = None):
    """Run a GIL-releasing kernel in a worker thread, calling report() while it runs. Past the
    budget's deadline, or on Ctrl-C, it asks the kernel to stop (progress[1]) and waits for it, so
    nothing is left running half-way."""
    out: list = []
    errors: list = []

    def work():
        try:
            t0 = time.perf_counter()
            out.append(kernel(*args))
            if budget is not None:
                budget.kernel_s += time.perf_counter() - t0
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    if hasattr(kernel, "typeof_pyval"):
        # A Numba kernel's first call loads it from the cache (~0.3 s): done here, so that the time
        # above is the simulation's own, the same for the first engine of a run as for the others.
        kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))

    def expire():
        if budget is not None and time.monotonic() >= budget.deadline and not progress[1]:
            progress[1] = 1
            budget.hit = True

    expire()  # a deadline already past stops the kernel before it starts, however fast it would be
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    # The last report comes after the worker ended, even if it ended before the first poll.
    try:
        while True:
            expire()
            worker.join(min(interval_s, max(budget.deadline - time.monotonic(), 0.001)) if budget else interval_s)
            alive = worker.is_alive()
            report(int(progress[0]))
            if not alive:
                break
    except KeyboardInterrupt:
        progress[1] = 1
        worker.join()
        raise
    if errors:
        raise errors[0]
    return out[0]


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
    reasons = [rejections(workload, pools) for _, pools in plans]
    notes = [rejection_note(eng.name, workload, reason, pools) for (eng, pools), reason in zip(plans, reasons)]
    for reason, note in zip(reasons, notes):
        if (reason > 0).all():  # a run of nothing but rejections is surely not what was meant
            raise FastsimError(note)
    for (eng, pools), reason in zip(plans, reasons):
        budget = WallBudget(deadline)
        api_s = engine_serving(eng).api_server_latency_ms * 1e-3
        engine_view = answered_through_api_server(workload, online, api_s)
        stage = f"simulating {eng.name}"
        report = (lambda done, stage=stage, admitted=int((reason == 0).sum()): say(stage, done, admitted))
        if cfg.cluster.disaggregation is not None:
            from fastsim.disaggregation import run_disaggregated

            out, extra = run_disaggregated(cfg, model, pools, engine_view, measured, reason, report, budget)
        else:
            out, extra = run_pools(cfg, model, pools, engine_view, measured, reason > 0, report,
                                   router=router_for(cfg, eng), budget=budget), {}
        wall = budget.kernel_s
        if api_s > 0:
            out = through_api_server(out, online, api_s)
        if extra:  # disaggregation's parts of each request's time, the API server's among them
            extra["api_server_ms"] = np.where(online, api_s * 1e3, 0.0)
        itl_hist, itl_stats, timeline, counters, gpu_time = out[8:13]
        table = request_table(eng.name, workload, reason, out)
        for name, column in extra.items():  # disaggregation: where each request's time went
            table = table.append_column(name, pa.array(column))
        summaries[eng.name] = summarize(table, itl_stats_from_histogram(itl_hist, itl_stats), cfg.simulation,
                                        cfg.slo, cluster_summary(eng, pools, counters, gpu_time, table, wall))
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
            timelines[eng.name] = pa.table({name: timeline[:, i] for i, name in enumerate(E.TL_COLUMNS)})
    return Result(pa.concat_tables(tables), summaries, timelines, pool_plans, [n for n in notes if n])


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


def through_api_server(out: tuple, online: np.ndarray, api_s: float) -> tuple:
    """The kernel's output with online requests' first token and finish seen api_s later: the API
    server's request path (parsing, tokenizing) and response path (detokenizing, streaming) add a
    near-constant latency outside the engine. The engine sees the request on arrival (the
    difference is a few ms of queueing order)."""
    first_tok, finish = out[2].copy(), out[3].copy()
    first_tok[online] += api_s
    finish[online] += api_s
    return out[:2] + (first_tok, finish) + out[4:]


def run_pools(cfg: Config, model: ModelSpec, pools: list[ReplicaPlan], workload: Workload, measured: np.ndarray,
              rejected: np.ndarray, report, *, arrival_s=None, prompt=None, output=None, kv0=None, session=None,
              router: str | None = None, stream: int = 0, budget: WallBudget | None = None) -> tuple:
    """One compiled run of the replicas of `pools` over the workload's requests (or the arrays given
    instead: a disaggregated decode pool sees its requests when their KV arrives)."""
    rep_int, rep_params, tok_table, seq_table = replica_arrays(model, pools, cfg.hardware.profile)
    arrival_s = workload.arrival_s if arrival_s is None else arrival_s
    n = len(arrival_s)
    # Random routing draws come from their own stream, so they never shift the workload's.
    draw = np.random.default_rng([cfg.simulation.seed, (1 << 20) + stream]).integers(0, rep_int.shape[0], n)
    counter = np.zeros(2, np.int64)  # [requests done, stop]
    args = (arrival_s, workload.prompt_tokens if prompt is None else prompt,
            workload.output_tokens if output is None else output, rejected, measured,
            workload.session if session is None else session, draw, E.ROUTE_NAMES[router_for(cfg, pools[0].engine, router)],
            route_params(cfg), rep_int, rep_params, tok_table, seq_table,
            cfg.simulation.max_sim_time_s or np.inf, cfg.output.timeline, counter,
            prefix_cache_arrays(rep_int, workload), (workload.next_turn, workload.think_s) if kv0 is None
            else (np.full(n, -1, np.int64), np.full(n, -1.0)), cfg.simulation.mode != "stepped",
            cfg.simulation.mode == "fast",
            (np.zeros(n, np.int64), np.zeros(n)) if kv0 is None else kv0)
    return run_polled(run_cluster_nb, args, counter, report, budget=budget)


def cluster_summary(eng: Engine, pools: list[ReplicaPlan], counters: np.ndarray, gpu_time: np.ndarray,
                    table: pa.Table, wall: float) -> dict:
    """fastsim's own figures: memory, iterations, preemptions, per replica and in total."""
    finished = table.column("finish_s").to_numpy()
    sim_s = float(np.nanmax(finished)) if np.isfinite(finished).any() else 0.0
    replicas = []
    for rp in pools:
        for _ in range(rp.count):
            c = counters[len(replicas)]
            compute_s, comm_s = float(gpu_time[len(replicas), 0]), float(gpu_time[len(replicas), 1])
            # Each GPU of a replica is busy for the forward passes of its pipeline stage.
            util = min((compute_s + comm_s) / rp.engine.pipeline_parallel_size / sim_s, 1.0) if sim_s > 0 else 0.0
            replicas.append({"replica": len(replicas), "pool": rp.pool, "gpu": rp.gpu.name,
                             "tensor_parallel_size": rp.engine.tensor_parallel_size,
                             "pipeline_parallel_size": rp.engine.pipeline_parallel_size,
                             "num_gpu_blocks": rp.memory.num_gpu_blocks, "requests": int(c[4]),
                             "iterations": int(c[0]), "preemptions": int(c[3]), "peak_kv_blocks_used": int(c[1]),
                             # Held by requests still running when the run ended (cached blocks count as free).
                             "kv_blocks_in_use_at_end": rp.memory.num_gpu_blocks - int(c[2]),
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
            "iterations": int(counters[:, 0].sum()), "preemptions": int(counters[:, 3].sum()),
            "decode_stretch_iterations": int(counters[:, 5].sum()),
            "closed_form_iterations": int(counters[:, 9].sum()),  # fast mode's (of the stretches)
            "prefix_cache_evictions": int(counters[:, 6].sum()),
            # Forward-pass time summed over iterations (and stages): TP communication apart.
            "compute_time_s": float(gpu_time[:, 0].sum()), "comm_time_s": float(gpu_time[:, 1].sum()),
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
