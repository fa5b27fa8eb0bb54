"""Disaggregated prefill and decode: the prefill pool computes each prompt and its first token;
the request's KV cache then travels to the decode pool, which generates the rest. Nothing flows
back from decode to prefill, so this is two compiled runs in sequence: the prefill pool over every
request with one output token, then the decode pool over the requests in the order their KV
arrives, each starting with its first token made and its prompt's KV computed (a decode
instance's first step for it is a decode)."""
from __future__ import annotations

import numpy as np

from fastsim.engine import enums as E
from fastsim.engine.bundles import KernelOut
from fastsim.kernel_run import run_pools
from fastsim.planning import router_for


def transfer_s(cfg, prefill_pool, prompt: np.ndarray) -> np.ndarray:
    """Seconds to move each request's prompt KV: every GPU of the prefill instance sends its shard
    (KV bytes per token per GPU) over its own link, after a fixed latency."""
    rate, latency = cfg.cluster.disaggregation.kv_transfer.rate_and_latency()
    return latency + prompt * prefill_pool.memory.kv_bytes_per_token / rate


def run_disaggregated(cfg, model, pools, workload, measured, reason, report, budget=None) -> tuple[KernelOut, dict]:
    """(the kernels' output for the whole deployment, extra per-request columns)."""
    dis = cfg.cluster.disaggregation
    prefill, decode = pools
    n = len(workload)
    rejected = reason > 0
    prompt, output = workload.prompt_tokens, workload.output_tokens
    ones = np.ones(n, np.int64)
    p_out = run_pools(cfg, model, [prefill], workload, measured, rejected, report, output=ones,
                      router=router_for(cfg, prefill.engine, dis.prefill_router), stream=0, budget=budget)
    p_status, p_sched, p_tok = p_out.status, p_out.first_scheduled_s, p_out.first_token_s
    # The first token is the prefill's; the KV follows, overlapped with the prefill or after it.
    move = transfer_s(cfg, prefill, prompt)
    if dis.kv_transfer.overlap:
        ready = np.maximum(p_tok + dis.kv_transfer.rate_and_latency()[1], p_sched + move)
    else:
        ready = p_tok + move
    goes = (p_status == E.FINISHED) & (output > 1)
    idx = np.flatnonzero(goes)
    idx = idx[np.argsort(ready[idx], kind="stable")]
    d_out = run_pools(cfg, model, [decode], workload, measured[idx], np.zeros(idx.size, np.bool_), report,
                      arrival_s=ready[idx], prompt=prompt[idx], output=output[idx],
                      kv0=(np.ones(idx.size, np.int64), p_tok[idx]), session=np.full(idx.size, -1, np.int64),
                      router=router_for(cfg, decode.engine, dis.decode_router), stream=1, budget=budget)

    status = p_status.copy()
    finish = np.where(p_status == E.FINISHED, p_tok, np.nan)
    generated = np.where(p_status == E.FINISHED, 1, 0).astype(np.int64)
    max_itl = np.zeros(n)
    prefill_replica = np.where(np.isnan(p_sched), -1, p_out.replica).astype(np.int32)
    replica = prefill_replica.copy()  # one-token requests end there
    preempts = p_out.preemptions.copy()
    d_first = np.full(n, np.nan)
    status[idx], finish[idx], generated[idx], max_itl[idx] = d_out.status, d_out.finish_s, d_out.generated, d_out.max_itl_s
    replica[idx] = d_out.replica + prefill.count
    preempts[idx] += d_out.preemptions
    d_first[idx] = d_out.first_scheduled_s
    arrival = workload.arrival_s
    timeline = p_out.timeline
    if d_out.timeline.shape[0]:
        tl = d_out.timeline.copy()
        tl[:, E.TL_REPLICA] += prefill.count
        timeline = np.concatenate([timeline, tl])
        timeline = timeline[np.argsort(timeline[:, E.TL_START_S], kind="stable")]
    out = KernelOut(status, p_sched, p_tok, finish, generated, preempts, max_itl, replica, p_out.cached_tokens, arrival,
                    d_out.itl_hist, d_out.itl_stats, timeline, np.concatenate([p_out.per_replica, d_out.per_replica]))
    went = ~np.isnan(d_first)
    extra = {
        "prefill_replica": prefill_replica,
        "prefill_queue_ms": (p_sched - arrival) * 1e3,
        "prefill_ms": (p_tok - p_sched) * 1e3,
        "transfer_ms": np.where(goes, (ready - p_tok) * 1e3, np.nan),
        "decode_queue_ms": np.where(went, (d_first - ready) * 1e3, np.nan),
        "decode_ms": np.where(went, (finish - d_first) * 1e3, np.nan),
    }
    return out, extra
