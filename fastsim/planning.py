"""Planning a run before anything is simulated: each engine's pools of replicas (GPU, engine
arguments after the framework's rules, KV-cache plan), the requests no replica can serve, whether the
run fits this machine's memory, and which router each pool uses."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from pydantic import ValidationError

from fastsim.catalog import GpuSpec, ModelSpec, load_gpu, load_model
from fastsim.catalog.gpus import load_gpu_file
from fastsim.config import ClosedLoop, Config, Engine, Pool, format_validation_error
from fastsim.engine import enums as E
from fastsim.errors import FastsimError
from fastsim.frameworks import FRAMEWORKS
from fastsim.memory import MemoryPlan, memory_plan
from fastsim.workload import Workload


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


def _request_limits(pools: list[ReplicaPlan]) -> tuple[int, int]:
    """(the most tokens a request may hold in the smallest whole KV cache, the smallest max_model_len):
    a request is checked against the most constrained pool, since the router may send it anywhere.
    SGLang admits a request only while its tokens fit strictly inside the free room."""
    kv_tokens = min(rp.memory.num_gpu_blocks * rp.engine.block_size
                    - FRAMEWORKS[rp.engine.framework].sglang_scheduler for rp in pools)
    return kv_tokens, min(rp.memory.max_model_len for rp in pools)


def rejections(workload: Workload, pools: list[ReplicaPlan]) -> np.ndarray:
    """Reason code per request: too long for the context, or for a replica's whole KV cache."""
    total = workload.prompt_tokens + workload.output_tokens
    kv_tokens, max_len = _request_limits(pools)
    reason = np.zeros(len(workload), np.int8)
    reason[total > kv_tokens] = E.REASON_KV
    reason[total > max_len] = E.REASON_CONTEXT
    return reason


def rejection_note(engine: str, workload: Workload, reason: np.ndarray, pools: list[ReplicaPlan]) -> str | None:
    """One line on the requests no replica of `engine` can serve, with the numbers that show why."""
    n = int((reason > 0).sum())
    if n == 0:
        return None
    total = workload.prompt_tokens + workload.output_tokens
    kv_tokens, max_len = _request_limits(pools)
    parts = []
    for code, limit, fix in ((E.REASON_CONTEXT, max_len,
                              "raise engine.max_model_len (up to the model's context) or shorten them"),
                             (E.REASON_KV, kv_tokens,
                              "give the KV cache more room (gpu_memory_utilization, a larger TP) or shorten them")):
        hit = reason == code
        if hit.any():
            low, high = int(total[hit].min()), int(total[hit].max())
            parts.append(f"{int(hit.sum()):,} {E.REASON_NAMES[code]} ({limit:,} tokens; they need "
                         f"{low:,}{f'-{high:,}' if high > low else ''} tokens of prompt + output): {fix}")
    head = (f"all {n:,} requests would be rejected, nothing to simulate" if n == len(workload) else
            f"{n:,} of {len(workload):,} requests are rejected")
    return f"{engine}: {head}: " + "; ".join(parts)


def check_requests(plans, workload: Workload) -> tuple[list[np.ndarray], list[str]]:
    """Per engine, why each request cannot be served (0: it can), and a note for each engine that
    rejects some; a run in which an engine would reject every request is refused (surely not what
    was meant). What `run` checks and `validate` reports, in one place."""
    reasons = [rejections(workload, pools) for _, pools in plans]
    notes = [rejection_note(eng.name, workload, reason, pools) for (eng, pools), reason in zip(plans, reasons)]
    for reason, note in zip(reasons, notes):
        if (reason > 0).all():
            raise FastsimError(note)
    return reasons, [n for n in notes if n]


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
        if eng.disable_sliding_window and model.sliding_window and FRAMEWORKS[eng.framework].sliding_window:
            # vLLM then caps the context at the window (tests/prefix_caching/test_disable_sliding_window.py).
            cap = min(eng.max_model_len or model.max_position_embeddings, model.sliding_window)
            eng = eng.model_copy(update={"max_model_len": cap})
        if eng.max_model_len and eng.max_model_len > model.max_position_embeddings:
            raise FastsimError(f"{where}.max_model_len = {eng.max_model_len} exceeds {model.name}'s context "
                               f"({model.max_position_embeddings}); use at most that")
        if eng.enable_prefix_caching and eng.scheduler == "v0":
            raise FastsimError(f"{where}.enable_prefix_caching is modelled for scheduler v1 only; "
                               "use scheduler: v1 or turn prefix caching off")
        if dis is not None and not FRAMEWORKS[eng.framework].disaggregation:
            raise FastsimError(f"{where}: disaggregation is modelled for vLLM, TensorRT-LLM and Dynamo engines; "
                               f"drop framework {eng.framework}")
        if dis is not None and j == 1 and eng.enable_prefix_caching:
            # Dynamo routes by the prefill workers' caches; a decode worker's cache is not modelled.
            if (not FRAMEWORKS[eng.framework].decode_pool_drops_prefix_cache
                    or pool.engine.get("enable_prefix_caching")):
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
    if not FRAMEWORKS[eng.framework].fp8_where_the_gpu_has_it or not gpu.fp8_tflops:
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
    default = FRAMEWORKS[engine.framework].default_router
    if default is not None and "router" not in cfg.cluster.model_fields_set:
        return default
    return cfg.cluster.router
