"""Disaggregated prefill and decode: the prefill pool computes each prompt and its first token;
the request's KV cache then travels to the decode pool, which generates the rest. Nothing flows
back from decode to prefill, so this is two compiled runs in sequence: the prefill pool over every
request with one output token, then the decode pool over the requests in the order their KV
arrives, each starting with its first token made and its prompt's KV computed (a decode
instance's first step for it is a decode)."""
from __future__ import annotations

import numpy as np

from fastsim.engine import enums as E
from fastsim.kernel_run import run_pools
from fastsim.planning import router_for


def transfer_s(cfg, prefill_pool, prompt: np.ndarray) -> np.ndarray:
    """Seconds to move each request's prompt KV: every GPU of the prefill instance sends its shard
    (KV bytes per token per GPU) over its own link, after a fixed latency."""
    rate, latency = cfg.cluster.disaggregation.kv_transfer.rate_and_latency()
    return latency + prompt * prefill_pool.memory.kv_bytes_per_token / rate


def run_disaggregated(cfg, model, pools, workload, measured, reason, report, budget=None) -> tuple[tuple, dict]:
    """(the kernel's output tuple for the whole deployment, extra per-request columns)."""
    dis = cfg.cluster.disaggregation
    prefill, decode = pools
    n = len(workload)
    rejected = reason > 0
    prompt, output = workload.prompt_tokens, workload.output_tokens
    ones = np.ones(n, np.int64)
    p_out = run_pools(cfg, model, [prefill], workload, measured, rejected, report, output=ones,
                      router=router_for(cfg, prefill.engine, dis.prefill_router), stream=0, budget=budget)
    p_status, p_sched, p_tok, _, _, p_preempts, _, p_replica = p_out[:8]
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
    d_status, d_sched, _, d_finish, d_generated, d_preempts, d_max_itl, d_replica = d_out[:8]

    status = p_status.copy()
    finish = np.where(p_status == E.FINISHED, p_tok, np.nan)
    generated = np.where(p_status == E.FINISHED, 1, 0).astype(np.int64)
    max_itl = np.zeros(n)
    prefill_replica = np.where(np.isnan(p_sched), -1, p_replica).astype(np.int32)
    replica = prefill_replica.copy()  # one-token requests end there
    preempts = p_preempts.copy()
    d_first = np.full(n, np.nan)
    status[idx], finish[idx], generated[idx], max_itl[idx] = d_status, d_finish, d_generated, d_max_itl
    replica[idx] = d_replica + prefill.count
    preempts[idx] += d_preempts
    d_first[idx] = d_sched
    arrival = workload.arrival_s
    timeline = p_out[10]
    if d_out[10].shape[0]:
        tl = d_out[10].copy()
        tl[:, E.TL_REPLICA] += prefill.count
        timeline = np.concatenate([timeline, tl])
        timeline = timeline[np.argsort(timeline[:, E.TL_START_S], kind="stable")]
    out = (status, p_sched, p_tok, finish, generated, preempts, max_itl, replica,
           d_out[8], d_out[9], timeline, np.concatenate([p_out[11], d_out[11]]),
           np.concatenate([p_out[12], d_out[12]]), p_out[13], arrival)
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
