"""`fastsim search`: the cheapest deployment that serves a target request rate within SLOs, and the
cost/latency Pareto frontier, over GPU types x tensor x pipeline parallelism x max_num_seqs x
max_num_batched_tokens, with the fewest data-parallel replicas that suffice for each.

Candidates whose model does not fit in memory are pruned before any simulation (the memory plan's
own check). For each remaining candidate the replica count is searched — 1, 2, 4, ... until the
SLOs hold, then bisection — assuming more replicas never make latency worse."""
from __future__ import annotations

import copy
import itertools
from dataclasses import asdict, dataclass

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
    if base_raw.get("engines") or (base_raw.get("cluster") or {}).get("pools"):
        raise FastsimError("search: the config must describe one engine (no `engines:` or `cluster.pools`); "
                           "the search chooses GPU, parallelism and engine limits itself")
    return scaled(base_raw, rate / offered_rate(build_config(base_raw)))


def why_not_fit(raw: dict, c: Candidate) -> str | None:
    """The memory plan's objection to one replica of c, or None if it fits (and has a price)."""
    from fastsim.simulation import plan_engines

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


def pareto(rows: list[dict], latency: str) -> list[dict]:
    """Rows meeting the SLOs that no other such row beats on both cost and latency, by cost."""
    ok = sorted((r for r in rows if r["meets"] and r.get(latency) is not None),
                key=lambda r: (r["cost_usd_per_hour"], r[latency]))
    front, best = [], float("inf")
    for r in ok:
        if r[latency] < best:
            front.append(r)
            best = r[latency]
    return front
