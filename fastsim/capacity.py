"""`fastsim capacity`: the highest request rate at which a deployment meets every SLO, found by
bisection on the rate. Every probe is the same seeded workload with its arrival rates scaled, so the
answer moves only with the rate, not with the draw."""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from fastsim.config import Config, build_config
from fastsim.errors import FastsimError

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
STATS = ("mean", "median", "p90", "p95", "p99")


@dataclass(frozen=True)
class SloTarget:
    metric: str
    stat: str
    limit: float

    @property
    def key(self) -> str:
        """The summary field it reads, in vLLM's naming: p99_ttft_ms."""
        return f"{self.stat}_{self.metric}"

    def __str__(self) -> str:
        return f"{self.metric}:{self.stat}<={self.limit:g}"


def parse_slo(item: str) -> SloTarget:
    """`ttft_ms:p99=500` (the statistic defaults to p99: `tpot_ms=50`)."""
    m = re.fullmatch(r"\s*([a-z0-9_]+)(?::([a-z0-9]+))?\s*=\s*([0-9.eE+-]+)\s*", item)
    if not m:
        raise FastsimError(f"--slo {item!r}: expected metric:stat=limit, e.g. ttft_ms:p99=500")
    metric, stat, raw = m.group(1), m.group(2) or "p99", m.group(3)
    if metric not in METRICS:
        raise FastsimError(f"--slo {item!r}: metric {metric!r} is not one of {', '.join(METRICS)}")
    if stat not in STATS:
        raise FastsimError(f"--slo {item!r}: statistic {stat!r} is not one of {', '.join(STATS)}")
    try:
        limit = float(raw)
    except ValueError:
        limit = math.nan
    if not limit > 0 or math.isinf(limit):
        raise FastsimError(f"--slo {item!r}: the limit must be a positive number of milliseconds")
    return SloTarget(metric, stat, limit)


def offered_rate(cfg: Config) -> float:
    """Requests (or conversations) per second that the workload's clients offer."""
    total = 0.0
    for i, c in enumerate(cfg.workload.clients):
        if c.arrival is None:  # a trace's own timestamps, rescaled to trace.rate if it gives one
            if c.trace.rate is None:
                raise FastsimError(f"workload.clients.{i}.trace: capacity scales arrival rates; set "
                                   "trace.rate (the replay's mean rate) so it can be scaled")
            total += c.trace.rate
        elif getattr(c.arrival, "rate", None) is None:
            raise FastsimError(f"workload.clients.{i}.arrival: capacity scales arrival rates; process "
                               f"{c.arrival.process!r} has none (use poisson, gamma or constant)")
        else:
            total += c.arrival.rate
    return total


def scaled(raw: dict, factor: float) -> dict:
    """The raw config with every client's offered rate (arrival rate, or a trace's rate when it
    replays its own timestamps) multiplied by factor."""
    out = copy.deepcopy(raw)
    for c in out["workload"]["clients"]:
        if c.get("arrival"):
            if c["arrival"].get("rate") is not None:
                c["arrival"]["rate"] *= factor
        elif c.get("trace") and c["trace"].get("rate") is not None:
            c["trace"]["rate"] *= factor
    return out


@dataclass
class Probe:
    rate: float
    meets: bool
    summary: dict
    why: str  # the first SLO missed, or ""


@dataclass
class Capacity:
    engine: str
    rate: float | None          # None: no rate tried meets the SLOs
    at_rate: dict | None        # the summary at that rate
    probes: list[Probe] = field(default_factory=list)


def judge(summary: dict, slos: list[SloTarget]) -> str:
    """'' if the run meets every SLO (and every measured request finished), else why not."""
    if summary["unfinished"] > 0:
        return f"{summary['unfinished']} requests unfinished"
    if summary["completed"] == 0:
        return "no request completed"
    for s in slos:
        v = summary.get(s.key)
        if v is None or v != v:
            return f"{s.key} undefined"
        if v > s.limit:
            return f"{s.key} = {v:.4g} > {s.limit:g}"
    return ""


def find_capacity(raw: dict, engine: str, slos: list[SloTarget], *, tolerance: float = 0.01,
                  max_probes: int = 60, report: Callable[[Probe], None] | None = None) -> Capacity:
    """Bisection (in log rate) between a rate that meets the SLOs and one that does not, from the
    config's own rate, doubling or halving first to bracket; stops when they are within tolerance."""
    from fastsim.simulation import simulate

    if not slos:
        raise FastsimError("capacity: give at least one --slo, e.g. --slo ttft_ms:p99=500")
    base = offered_rate(build_config(raw))
    result = Capacity(engine, None, None)

    def probe(rate: float) -> Probe:
        if len(result.probes) >= max_probes:
            raise FastsimError(f"capacity: no answer within {max_probes} simulations (last rate {rate:.4g} req/s)")
        summary = simulate(build_config(scaled(raw, rate / base))).summaries[engine]
        why = judge(summary, slos)
        p = Probe(rate, not why, summary, why)
        result.probes.append(p)
        if report:
            report(p)
        return p

    first = probe(base)
    lo, hi = (first, None) if first.meets else (None, first)
    rate = base
    while lo is None or hi is None:
        rate = rate * 2 if hi is None else rate / 2
        if rate > base * 2**20 or rate < base / 2**20:
            break
        p = probe(rate)
        if p.meets:
            lo = p
        else:
            hi = p
    if lo is None:
        return result  # not even at base / 2^20: the SLO is out of reach (the probes say why)
    if hi is None:
        raise FastsimError(f"capacity: the SLOs still hold at {lo.rate:.4g} req/s ({2**20}x the config's rate); "
                           "is the workload too short to load the deployment?")
    while hi.rate / lo.rate - 1 > tolerance:
        p = probe(math.sqrt(lo.rate * hi.rate))
        if p.meets:
            lo = p
        else:
            hi = p
    result.rate, result.at_rate = lo.rate, lo.summary
    return result


def engine_configs(raw: dict) -> list[tuple[str, dict]]:
    """(engine name, raw config holding that engine alone) for each engine of the config."""
    cfg = build_config(raw)
    names = [e.name for e in cfg.engine_variants()]
    if not raw.get("engines"):
        return [(names[0], raw)]
    return [(name, {**raw, "engines": [{**raw["engines"][i], "name": name}]}) for i, name in enumerate(names)]
