"""Per-request Arrow table and vLLM-benchmark-style summary from the engine's arrays."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastsim.config import Simulation, Slo
from fastsim.engine import enums as E
from fastsim.engine.bundles import KernelOut

# The numeric columns of the per-request table, defined once: the Arrow schema derives from it.
REQUEST_DTYPE = np.dtype([
    ("request_id", np.int64), ("replica", np.int32), ("session", np.int64), ("turn", np.int64),
    ("arrival_s", np.float64),
    ("first_scheduled_s", np.float64), ("first_token_s", np.float64), ("finish_s", np.float64),
    ("prompt_tokens", np.int64), ("output_tokens", np.int64), ("generated_tokens", np.int64),
    ("preemptions", np.int64), ("cached_tokens", np.int64), ("ttft_ms", np.float64), ("tpot_ms", np.float64), ("e2el_ms", np.float64),
    ("queue_ms", np.float64), ("mean_itl_ms", np.float64), ("max_itl_ms", np.float64),
])
STRING_COLUMNS = ("engine", "client", "status", "reject_reason")


def request_schema() -> pa.Schema:
    fields = [pa.field(name, pa.from_numpy_dtype(REQUEST_DTYPE[name])) for name in REQUEST_DTYPE.names]
    fields[1:1] = [pa.field(c, pa.dictionary(pa.int32(), pa.string())) for c in STRING_COLUMNS]
    return pa.schema(fields)


def _dictionary(codes: np.ndarray, names: list[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(names, pa.string()))


def request_table(engine: str, workload, rejected_reason: np.ndarray, out: KernelOut) -> pa.Table:
    status, first_sched, first_tok, finish = out.status, out.first_scheduled_s, out.first_token_s, out.finish_s
    generated, preempts, max_itl, replica = out.generated, out.preemptions, out.max_itl_s, out.replica
    arrival = out.arrival_s  # later turns of conversations arrive when the simulation says
    n = len(workload)
    # One contiguous array per column (a structured array's fields are strided and copy slowly).
    rec = {name: np.zeros(n, REQUEST_DTYPE[name]) for name in REQUEST_DTYPE.names}
    rec["request_id"] = np.arange(n)
    rec["session"] = workload.session
    rec["turn"] = workload.turn
    rec["arrival_s"] = arrival
    rec["first_scheduled_s"] = first_sched
    rec["first_token_s"] = first_tok
    rec["finish_s"] = finish
    rec["prompt_tokens"] = workload.prompt_tokens
    rec["output_tokens"] = workload.output_tokens
    rec["generated_tokens"] = generated
    rec["preemptions"] = preempts
    rec["replica"] = replica
    rec["cached_tokens"] = out.cached_tokens
    rec["ttft_ms"] = (first_tok - arrival) * 1e3
    rec["e2el_ms"] = (finish - arrival) * 1e3
    rec["queue_ms"] = (first_sched - arrival) * 1e3
    with np.errstate(invalid="ignore", divide="ignore"):
        # vLLM's TPOT: time after the first token over the remaining tokens; undefined for one token.
        tpot = np.where(generated > 1, (finish - first_tok) / (generated - 1) * 1e3, np.nan)
    rec["tpot_ms"] = tpot
    rec["mean_itl_ms"] = tpot
    rec["max_itl_ms"] = np.where(generated > 1, max_itl * 1e3, np.nan)
    status_codes = sorted(set(E.STATUS_NAMES.values()))
    status_idx = np.array([status_codes.index(E.STATUS_NAMES[int(s)]) for s in range(5)])[status]
    reason_names = [E.REASON_NAMES[k] for k in sorted(E.REASON_NAMES)]
    columns = {name: pa.array(rec[name]) for name in REQUEST_DTYPE.names}
    columns["engine"] = _dictionary(np.zeros(n), [engine])
    columns["client"] = _dictionary(workload.client, list(workload.client_names))
    columns["status"] = _dictionary(status_idx, status_codes)
    columns["reject_reason"] = _dictionary(rejected_reason, reason_names)
    schema = request_schema()
    return pa.table([columns[f.name] for f in schema], schema=schema)


def _stats(prefix: str, values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {f"{k}_{prefix}": math.nan for k in ("mean", "median", "std", "p90", "p95", "p99")}
    # One partial sort for all four quantiles (the median is the 50th percentile).
    p50, p90, p95, p99 = np.percentile(values, (50, 90, 95, 99))
    return {f"mean_{prefix}": float(values.mean()), f"median_{prefix}": float(p50),
            f"std_{prefix}": float(values.std()), f"p90_{prefix}": float(p90), f"p95_{prefix}": float(p95),
            f"p99_{prefix}": float(p99)}


def itl_bin_edges_s() -> np.ndarray:
    """The ITL histogram's ITL_BINS + 1 bin edges: each octave from ITL_MIN_S in equal steps."""
    per_octave = 1 << E.ITL_OCTAVE_BITS
    octave = 2.0 ** (E.ITL_MIN_EXP + np.arange(E.ITL_BINS + 1) // per_octave)
    return octave * (1.0 + (np.arange(E.ITL_BINS + 1) % per_octave) / per_octave)


def itl_stats_from_histogram(hist: np.ndarray, stats: np.ndarray) -> dict[str, float]:
    """ITL over every token gap of the run: mean and std exact, percentiles to one bin."""
    count, total, sumsq = stats
    if count == 0:
        return _stats("itl_ms", np.zeros(0))
    mean = total / count
    edges = itl_bin_edges_s()
    mids = np.sqrt(edges[:-1] * edges[1:]) * 1e3
    cum = np.cumsum(hist)

    def pct(q: float) -> float:
        return float(mids[np.searchsorted(cum, q / 100 * (cum[-1] - 1) + 1)])

    return {"mean_itl_ms": mean * 1e3, "median_itl_ms": pct(50),
            "std_itl_ms": math.sqrt(max(sumsq / count - mean * mean, 0.0)) * 1e3,
            "p90_itl_ms": pct(90), "p95_itl_ms": pct(95), "p99_itl_ms": pct(99)}


def summarize(table: pa.Table, itl: dict, sim: Simulation, slo: Slo, extra: dict) -> dict:
    """vLLM `benchmark_serving` field names over the measured window (requests arriving after the
    warm-up and before the cool-down), plus fastsim's own counts; completed + rejected + unfinished
    = measured_requests."""
    arrival = table.column("arrival_s").to_numpy()
    status = {name: pc.equal(table.column("status"), name).to_numpy(zero_copy_only=False)
              for name in ("finished", "rejected", "unfinished")}
    arrived = ~np.isnan(arrival)
    last_arrival = arrival[arrived].max() if arrived.any() else 0.0
    window = (arrival >= sim.warmup_s) & (arrival <= last_arrival - sim.cooldown_s)
    if sim.cooldown_s == 0:
        window |= ~arrived  # a later turn whose conversation stopped short counts as unfinished
    done = window & status["finished"]
    served = window & ~status["rejected"]
    col = {c: table.column(c).to_numpy(zero_copy_only=False) for c in
           ("prompt_tokens", "generated_tokens", "ttft_ms", "tpot_ms", "e2el_ms", "finish_s", "queue_ms",
            "cached_tokens")}
    finish = col["finish_s"][done]
    start = sim.warmup_s if sim.warmup_s > 0 else 0.0
    duration = float(finish.max() - start) if finish.size else 0.0
    completed = int(done.sum())
    in_tok = int(col["prompt_tokens"][done].sum())
    out_tok = int(col["generated_tokens"][done].sum())
    good = done.copy()
    for name in ("ttft_ms", "tpot_ms", "e2el_ms"):
        limit = getattr(slo, name)
        if limit is not None:
            v = col[name]
            good &= np.nan_to_num(v, nan=0.0) <= limit  # a one-token request has no TPOT to miss
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    out = {
        "completed": completed, "duration": duration, "total_input_tokens": in_tok,
        "total_output_tokens": out_tok, "request_throughput": per_s(completed),
        "request_goodput": per_s(int(good.sum())) if any(
            getattr(slo, n) is not None for n in ("ttft_ms", "tpot_ms", "e2el_ms")) else None,
        "output_throughput": per_s(out_tok), "total_token_throughput": per_s(in_tok + out_tok),
    }
    out |= _stats("ttft_ms", col["ttft_ms"][done])
    tpot = col["tpot_ms"][done]
    out |= _stats("tpot_ms", tpot[~np.isnan(tpot)])
    out |= itl
    out |= _stats("e2el_ms", col["e2el_ms"][done])
    out |= {"mean_queue_ms": float(col["queue_ms"][done].mean()) if completed else math.nan,
            # Share of the prompt tokens found in the prefix cache when first scheduled, over the
            # measured requests that reached a replica (a rejected request asks no cache).
            "prefix_cache_hit_rate": float(col["cached_tokens"][served].sum() / max(col["prompt_tokens"][served].sum(), 1))}
    out |= {"num_requests": int(arrival.size), "measured_requests": int(window.sum()),
            "rejected": int((window & status["rejected"]).sum()),
            "unfinished": int((window & status["unfinished"]).sum()),
            "slo": {k: v for k, v in slo.model_dump().items() if v is not None}}
    out |= extra
    return out


def load_report(table: pa.Table, open_loop: np.ndarray) -> dict:
    """Offered load against what was served, over the requests of open-loop clients (their arrivals
    do not wait for answers: Poisson, gamma, constant rates, traces). Overloaded: they were served at
    under 0.9 of the rate they came, and the queue grew through the run (the last tenth of arrivals
    waited over 10x the first tenth, and over a second), so the figures describe a growing backlog
    rather than a steady state."""
    arrival = table.column("arrival_s").to_numpy()
    rows = np.flatnonzero(open_loop & ~np.isnan(arrival))
    if rows.size < 20:
        return {}
    order = rows[np.argsort(arrival[rows], kind="stable")]
    span = float(arrival[order[-1]] - arrival[order[0]])
    if span <= 0:
        return {}
    finish = table.column("finish_s").to_numpy()[order]
    queue = table.column("queue_ms").to_numpy()[order]
    finished = ~np.isnan(finish)
    end = float(np.nanmax(finish)) if finished.any() else float(arrival[order[-1]])
    offered = (order.size - 1) / span
    served = finished.sum() / (end - arrival[order[0]]) if finished.any() else 0.0
    tenth = max(order.size // 10, 1)
    first = float(np.nanmean(queue[:tenth])) if finished[:tenth].any() else 0.0
    # A request still waiting at the end has waited at least until then.
    late = float(np.mean(np.where(np.isnan(queue[-tenth:]), (end - arrival[order[-tenth:]]) * 1e3, queue[-tenth:])))
    overloaded = bool(served < 0.9 * offered and late > max(10 * first, 1000.0))
    return {"offered_request_rate": offered, "served_request_rate": float(served),
            "late_queue_ms": late, "overloaded": overloaded}
