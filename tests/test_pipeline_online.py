"""Pipeline parallelism under online traffic, explained (issue 30, item 6).

Llama-3-70B on four H100s with PP 4 sustains far less online traffic than with TP 4 (about 1.3
against 3.3 req/s of the default chat workload), while offline it reaches 0.87x TP 4's throughput.
That follows from how vLLM V1 runs a pipeline (vllm/v1/engine/core.py, step_with_batch_queue):
up to PP batches are in flight; a new batch is scheduled whenever some request is not in flight
and the queue has room; a request's next token is scheduled only when its batch has come back
through every stage. So each decoding request gets one token per round trip of the pipeline, about
PP x one stage's time, where TP's step is one (smaller) pass: at the concurrency the KV cache
allows, PP's decode rate is a fraction of TP's, and online load past it fills the cache and
preempts. Offline, batches are large and compute-bound, and the stages stay busy.
"""
import numpy as np
import pytest

from fastsim.config import build_config
from fastsim.engine import cost_nb as nb
from fastsim.engine.bundles import Batch
from fastsim.kernel_run import replica_arrays
from fastsim.planning import plan_engines
from fastsim.simulation import simulate

MODEL = "meta-llama/Meta-Llama-3-70B"


def config(engine, prompts, outputs, n=1, rate=None):
    arrival = {"process": "batch"} if rate is None else {"process": "poisson", "rate": rate}
    return build_config({"model": MODEL, "hardware": {"gpu": "H100-SXM"}, "simulation": {"mode": "exact", "seed": 1},
                         "engine": engine, "output": {"timeline": True},
                         "workload": {"num_requests": n, "clients": [{"online": False, "arrival": arrival,
                                      "prompt_tokens": {"dist": "constant", "value": prompts},
                                      "output_tokens": {"dist": "constant", "value": outputs}}]}})


def test_a_decoding_request_waits_for_its_batch_to_cross_every_stage():
    """One request alone: each token takes the CPU's time, four stages' layers, three sends and the
    LM head (the kernels' own stage times, composed here); TP 4's step is ~40% of it."""
    prompt, out = 16, 101
    cfg = config({"pipeline_parallel_size": 4}, prompt, out)
    pp = simulate(cfg)
    tp = simulate(config({"tensor_parallel_size": 4}, prompt, out))
    model, _, plans = plan_engines(cfg)
    _, params, tok, seq = replica_arrays(model, plans[0][1], None)
    p = params[0]
    hand = []
    for j in range(1, out):  # the j-th decode attends over the prompt and j tokens
        agg = Batch(1, float(prompt + j), 0, 0, 0.0, 0.0)
        body, head = nb.stage_time_nb(p, tok, seq, 0, 0, agg)
        hand.append(nb.cpu_overhead_nb(p, agg) + 4 * body + 3 * nb.pp_send_time_nb(p, 1) + head)
    tpot_pp = pp.requests.column("tpot_ms").to_numpy()[0]
    assert tpot_pp == pytest.approx(np.mean(hand) * 1e3, rel=1e-9)
    # 50 ms against 20: TP 4 reads a quarter of the weights per GPU too, in one pass, plus all-reduces
    assert tpot_pp > 2.4 * tp.requests.column("tpot_ms").to_numpy()[0]


def test_cohorts_keep_their_micro_batch_as_vllm_v1_schedules_them():
    """Two requests, the second arriving while the first one's batch is in flight: it is scheduled
    at once in a batch of its own (the queue has room), and from then on each comes back and is
    rescheduled alone: every decode batch holds one request. Arriving together, they share one."""
    apart = simulate(config({"pipeline_parallel_size": 2}, 16, 60, n=2, rate=50.0))
    tl = next(iter(apart.timelines.values())).to_pandas()
    first = apart.requests.column("first_scheduled_s").to_numpy()
    assert first[1] - first[0] < tl["duration_s"].iloc[0]  # the second came while the first was in flight
    decodes = tl[tl["prefill_tokens"] == 0]
    assert (decodes["num_seqs"] == 1).all() and len(decodes) > 100
    together = simulate(config({"pipeline_parallel_size": 2}, 16, 60, n=2))
    tl = next(iter(together.timelines.values())).to_pandas()
    assert (tl["num_seqs"] == 2).all()
