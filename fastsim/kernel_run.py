"""Running pools of replicas through the compiled engine: their settings, cost tables and prefix-cache
state packed as the kernel reads them, the kernel run in a thread that reports progress and stops on
Ctrl-C or when the wall-clock budget runs out."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from fastsim.catalog import ModelSpec
from fastsim.config import Config
from fastsim.cost import CostModel
from fastsim.cost.profile import load_profile
from fastsim.cost.serving import engine_serving
from fastsim.cost.speculative import speculative_cost_model
from fastsim.engine import cost_nb as nb
from fastsim.engine import enums as E
from fastsim.engine import prefix_nb as px
from fastsim.engine.bundles import KernelOut
from fastsim.engine.cluster_nb import run_cluster_nb
from fastsim.frameworks import FRAMEWORKS
from fastsim.memory import kv_dtype, stage_layers
from fastsim.planning import ReplicaPlan, router_for
from fastsim.workload import Workload


def measured_mask(workload: Workload, cfg: Config) -> np.ndarray:
    t = workload.arrival_s
    last = t.max() if t.size else 0.0
    return (t >= cfg.simulation.warmup_s) & (t <= last - cfg.simulation.cooldown_s)


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
        ints[E.RI_SGLANG] = FRAMEWORKS[eng.framework].sglang_scheduler
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


def prefix_cache_arrays(rep_int: np.ndarray, workload: Workload, defer: bool = True) -> px.PrefixCache:
    """The prefix caches run_cluster_nb takes: room for the blocks and hash tables of the replicas
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
    return px.PrefixCache(pool, table, rep, slots, content, running, shareable, rows, free_rows)


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


def run_pools(cfg: Config, model: ModelSpec, pools: list[ReplicaPlan], workload: Workload, measured: np.ndarray,
              rejected: np.ndarray, report, *, arrival_s=None, prompt=None, output=None, kv0=None, session=None,
              router: str | None = None, stream: int = 0, budget: WallBudget | None = None) -> KernelOut:
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
