"""`fastsim search`: the cheapest deployment that serves a target request rate within SLOs, and the
cost/latency Pareto frontier, over GPU types x tensor x pipeline parallelism x max_num_seqs x
max_num_batched_tokens, with the fewest data-parallel replicas that suffice for each.

Candidates whose model does not fit in memory are pruned before any simulation (the memory plan's
own check). For each remaining candidate the replica count is searched — 1, 2, 4, ... until the
SLOs hold, then bisection — assuming more replicas never make latency worse."""
from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastsim.capacity import SloTarget, judge, offered_rate, scaled
from fastsim.config import build_config
from fastsim.errors import FastsimError


@dataclass(frozen=True)
class Candidate:
    gpu: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    max_num_seqs: int
    max_num_batched_tokens: int

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def deployment_raw(base_raw: dict, c: Candidate, replicas: int) -> dict:
    raw = copy.deepcopy(base_raw)
    raw.pop("sweep", None)
    raw.setdefault("hardware", {})["gpu"] = c.gpu
    raw["engine"] = {**raw.get("engine", {}), "tensor_parallel_size": c.tensor_parallel_size,
                     "pipeline_parallel_size": c.pipeline_parallel_size, "data_parallel_size": replicas,
                     "max_num_seqs": c.max_num_seqs, "max_num_batched_tokens": c.max_num_batched_tokens}
    return raw


def at_rate(base_raw: dict, rate: float) -> dict:
    """The base config with its clients' rates scaled to a total of `rate` requests/s."""
    cluster = base_raw.get("cluster") or {}
    if base_raw.get("engines") or cluster.get("pools") or cluster.get("disaggregation"):
        raise FastsimError("search: the config must describe one engine (no `engines:`, `cluster.pools` or "
                           "`cluster.disaggregation`); the search chooses GPU, parallelism and engine limits "
                           "itself")
    return scaled(base_raw, rate / offered_rate(build_config(base_raw)))


def why_not_fit(raw: dict, c: Candidate) -> str | None:
    """The memory plan's objection to one replica of c, or None if it fits (and has a price)."""
    from fastsim.planning import plan_engines

    try:
        _, _, plans = plan_engines(build_config(deployment_raw(raw, c, 1)))
    except FastsimError as e:
        return str(e)
    gpu = plans[0][1][0].gpu
    if gpu.price_usd_per_hour is None:
        return f"{c.gpu} has no price; set hardware.prices_usd_per_hour: {{{c.gpu}: ...}}"
    return None


def fewest_replicas(raw: dict, c: Candidate, slos: list[SloTarget], max_replicas: int) -> list[dict]:
    """Every simulation tried for c (a dict per replica count), in the order tried."""
    from fastsim.simulation import simulate
    from fastsim.sweep import flat_summary

    probes: dict[int, dict] = {}

    def probe(dp: int) -> bool:
        result = simulate(build_config(deployment_raw(raw, c, dp)))
        summary = flat_summary(next(iter(result.summaries.values())))  # the config's one engine
        why = judge(summary, slos)
        probes[dp] = {**asdict(c), "data_parallel_size": dp, "num_gpus": dp * c.gpus_per_replica,
                      "meets": not why, "why_not": why or None, **summary}
        return not why

    lo, hi = 0, None  # lo: most replicas known to miss; hi: fewest known to meet
    dp = 1
    while hi is None and dp <= max_replicas:
        if probe(dp):
            hi = dp
        else:
            lo = dp
            dp = min(dp * 2, max_replicas) if dp < max_replicas else max_replicas + 1
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            hi = mid
        else:
            lo = mid
    return list(probes.values())


def candidates(gpus: list[str], tp: list[int], pp: list[int], seqs: list[int], tokens: list[int]) -> list[Candidate]:
    return [Candidate(*v) for v in itertools.product(gpus, tp, pp, seqs, tokens)]


OBJECTIVES = ("cost_usd_per_hour", "usd_per_1m_output_tokens", "energy_per_1k_output_tokens_j", "num_gpus",
              "mean_power_w")


def pareto(rows: list[dict], latency: str, objective: str = "cost_usd_per_hour") -> list[dict]:
    """Rows meeting the SLOs that no other such row beats on both the objective and latency, best
    objective first."""
    ok = sorted((r for r in rows if r["meets"] and r.get(latency) is not None and r.get(objective) is not None),
                key=lambda r: (r[objective], r[latency]))
    front, best = [], float("inf")
    for r in ok:
        if r[latency] < best:
            front.append(r)
            best = r[latency]
    return front


@dataclass
class SearchSpace:
    gpus: list[str]  # empty: every catalog GPU (and gpus_file entry) with a price
    tensor_parallel_size: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    pipeline_parallel_size: list[int] = field(default_factory=lambda: [1])
    max_num_seqs: list[int] = field(default_factory=lambda: [256])
    max_num_batched_tokens: list[int] = field(default_factory=lambda: [8192])
    max_replicas: int = 16


@dataclass
class SearchOutcome:
    request_rate: float
    latency: str
    rows: list[dict]       # every simulation, best objective first
    frontier: list[dict]   # the Pareto frontier, best first (its first: the best meeting the SLOs)
    pruned: dict[Candidate, str]
    deployments: int
    table_path: Path


_KEYS = ("gpu", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "max_num_seqs",
         "max_num_batched_tokens", "num_gpus", "cost_usd_per_hour")


def run_search(raw: dict, rate: float | None, slos: list[SloTarget], space: SearchSpace, out_dir: Path, *,
               latency: str | None = None, objective: str = "cost_usd_per_hour", executor: str = "local",
               jobs: int = 1, address: str | None = None, progress: Callable[[int, int, int], None] | None = None) -> SearchOutcome:
    """Prune, simulate each remaining deployment's replica counts in parallel, write
    <out_dir>/search.parquet (every simulation; `pareto` marks the frontier) and search.json."""
    import pyarrow as pa

    from fastsim.catalog.gpus import builtin_gpus, load_gpu_file
    from fastsim.executors import run_tasks
    from fastsim.output import write_json_atomic, write_table_atomic

    if not slos:
        raise FastsimError("search: give at least one --slo, e.g. --slo ttft_ms:p99=500")
    if objective not in OBJECTIVES:
        raise FastsimError(f"--objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    cfg = build_config(raw)
    target = rate if rate is not None else offered_rate(cfg)
    raw = at_rate(raw, target)
    lat = latency or slos[0].key
    gpus = space.gpus
    if not gpus:
        known = {**builtin_gpus(), **(load_gpu_file(cfg.hardware.gpus_file) if cfg.hardware.gpus_file else {})}
        gpus = [g for g, spec in known.items() if spec.price_usd_per_hour or g in cfg.hardware.prices_usd_per_hour]
    cands = candidates(gpus, space.tensor_parallel_size, space.pipeline_parallel_size, space.max_num_seqs,
                       space.max_num_batched_tokens)
    pruned = {c: why for c in cands if (why := why_not_fit(raw, c)) is not None}
    viable = [c for c in cands if c not in pruned]
    if not viable:
        raise FastsimError(f"search: no candidate fits ({len(cands)} tried; e.g. {next(iter(pruned.values()))})")
    rows: list[dict] = []
    if progress:
        progress(0, len(viable), len(pruned))
    tasks = [(i, raw, c, slos, space.max_replicas) for i, c in enumerate(viable)]
    for n, (_, probes, crash) in enumerate(run_tasks(fewest_replicas, tasks, executor, jobs, address), start=1):
        if crash is None:
            rows.extend(probes)
        if progress:
            progress(n, len(viable), len(pruned))
    if not rows:
        raise FastsimError("search: every simulation failed")
    if lat not in rows[0]:
        raise FastsimError(f"--latency {lat!r}: not a summary metric; e.g. p99_ttft_ms, mean_e2el_ms")
    # Workers finish in any order: sort on every key so the table does not depend on it.
    inf = float("inf")
    rows.sort(key=lambda r: (r[objective] if r.get(objective) is not None else inf,
                             r[lat] if r.get(lat) is not None else inf, *(str(r[k]) for k in _KEYS)))
    front = pareto(rows, lat, objective)
    on_front = {id(r) for r in front}
    for r in rows:
        r["pareto"] = id(r) in on_front
    meta = {"request_rate": target, "slos": [str(s) for s in slos], "latency": lat, "objective": objective}
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"fastsim.search": json.dumps(meta)})
    path = write_table_atomic(table, out_dir / "search", "parquet")
    keys = list(dict.fromkeys([*_KEYS, objective, lat]))
    write_json_atomic(out_dir / "search.json", {
        "request_rate": target, "slos": meta["slos"], "latency_metric": lat, "objective": objective,
        "best": {k: front[0][k] for k in keys} if front else None,
        "cheapest": ({k: r[k] for k in keys} if (r := min(
            (x for x in rows if x["meets"]), key=lambda x: (x["cost_usd_per_hour"], x[lat] if x.get(lat) is not None
                                                           else inf), default=None)) else None),
        "pareto": [{k: r[k] for k in keys} for r in front],
        "pruned": [{"candidate": str(c), "why": w} for c, w in pruned.items()]})
    return SearchOutcome(target, lat, rows, front, pruned, len(viable), path)
