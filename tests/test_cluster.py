"""Tensor, pipeline and data parallelism: hand-computed cases, routing, and statistical checks."""
import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fastsim.config import load_config
from fastsim.cost import CostModel
from fastsim.cost.profile import default_profile
from fastsim.cost.serving import serving_profile
from fastsim.engine import cluster_nb as cl
from fastsim.engine import cost_nb as nb
from fastsim.engine import enums as E
from fastsim.errors import FastsimError
from fastsim.simulation import simulate
from test_engine import OVERHEAD, run

LLAMA = "meta-llama/Meta-Llama-3-8B"


@given(times=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, np.inf]), min_size=1, max_size=70))
def test_the_replica_deciding_first_is_the_earliest_then_the_lowest_numbered(times):
    leaves = 1 << (len(times) - 1).bit_length()
    tree = np.full(2 * leaves, np.inf)
    for r, t in enumerate(times):
        cl._tree_update(tree, leaves, r, t)
    assert tree[1] == min(times)
    if min(times) < np.inf:
        assert cl._tree_argmin(tree, leaves) == times.index(min(times))


def test_round_robin_assignment_is_exact():
    r = run(np.linspace(0, 1, 20), [50] * 20, [5] * 20, replicas=3, policy=E.ROUTE_ROUND_ROBIN,
            rejected=np.arange(20) == 4)
    kept = np.flatnonzero(np.arange(20) != 4)
    assert r.replica[kept].tolist() == [i % 3 for i in range(19)]
    assert r.replica[4] == -1
    assert r.per_replica["requests"].tolist() == [7, 6, 6]


def test_least_requests_avoids_the_busy_replica():
    # Request 0 is long and keeps replica 0 busy; each short one is done before the next arrives.
    r = run([0.0, 0.05, 0.1, 0.15], [100, 10, 10, 10], [2000, 2, 2, 2], replicas=2,
            policy=E.ROUTE_LEAST_REQUESTS)
    assert r.replica.tolist() == [0, 1, 1, 1]


def test_least_kv_prefers_the_emptier_cache():
    r = run([0.0, 0.0, 0.5], [4000, 100, 50], [500, 500, 5], replicas=2, policy=E.ROUTE_LEAST_KV)
    # At t=0 both are empty (ties go to the fewest outstanding, then the lowest index);
    # at 0.5 s replica 0 holds 4,000 tokens of KV, replica 1 only 100.
    assert r.replica.tolist() == [0, 1, 1]


def test_session_affinity_sticks():
    session = [0, 1, 0, 2, 1, 0]
    r = run(np.arange(6) * 0.1, [20] * 6, [3] * 6, replicas=3, policy=E.ROUTE_SESSION_AFFINITY, session=session)
    rep = r.replica
    assert rep[0] == rep[2] == rep[5] and rep[1] == rep[4]


def test_random_routing_uses_the_seeded_draws():
    r = run(np.arange(200) * 0.01, [20] * 200, [3] * 200, replicas=4, policy=E.ROUTE_RANDOM)
    assert np.array_equal(r.replica, np.random.default_rng(0).integers(0, 4, 200))


def test_pipeline_one_request_by_hand():
    """PP=2: each step crosses both stages (half the layers each), a send between them, the LM
    head on the last; steps do not overlap with a single request."""
    cm2 = CostModel.create(LLAMA, "H100-SXM", layers=16)
    r = run([0.0], [100], [3], stages=2, cm=cm2)

    def step(dec=(), new=(), ctx=()):
        agg = cm2.batch_aggregates(np.array(dec, np.int64), np.array(new, np.int64), np.array(ctx, np.int64))
        tok, seq = nb.build_tables_nb(cm2.params, cm2.ops, 8192, 256)
        body, head = nb.stage_time_nb(cm2.params, tok, seq, 0, 0, agg)  # one stage: 16 layers
        return OVERHEAD + body + nb.pp_send_time_nb(cm2.params, agg.n_decodes + agg.prefill_tokens) + body + head

    t1 = step(new=[100], ctx=[0])
    t2 = t1 + step(dec=[100])
    t3 = t2 + step(dec=[101])
    assert r.first_token_s[0] == pytest.approx(t1, rel=1e-12)
    assert r.finish_s[0] == pytest.approx(t3, rel=1e-12)


def test_pipeline_keeps_two_micro_batches_in_flight():
    """Two requests, PP=2: the second is scheduled while the first's batch is still in stage 2."""
    r = run([0.0, 0.0], [50, 50], [20, 20], stages=2, max_num_batched_tokens=60,
            cm=CostModel.create(LLAMA, "H100-SXM", layers=16))
    tl = r.timeline
    starts, ends = tl[:, E.TL_START_S], tl[:, E.TL_START_S] + tl[:, E.TL_DURATION_S]
    assert (starts[1:] < ends[:-1]).any()  # a batch starts before the previous one finished
    assert (r.status == E.FINISHED).all() and r.generated.tolist() == [20, 20]


def cfg_dict(**engine):
    return {"model": LLAMA, "hardware": {"gpu": "H100-SXM"}, "engine": engine,
            "workload": {"num_requests": 8, "clients": [{"arrival": {"process": "batch"},
                                                        "prompt_tokens": {"dist": "constant", "value": 32},
                                                        "output_tokens": {"dist": "constant", "value": 128}}]}}


def write(tmp_path, d):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_pp_one_request_slower_per_token_but_within_reason(tmp_path):
    one = cfg_dict()
    one["workload"]["num_requests"] = 1
    tp1 = simulate(write(tmp_path, one)).summary["mean_tpot_ms"]
    pp2 = simulate(load_config(write(tmp_path, one), ["engine.pipeline_parallel_size=2"])).summary["mean_tpot_ms"]
    assert tp1 < pp2 < 1.3 * tp1


def test_pp_reaches_more_throughput_under_load(tmp_path):
    d = cfg_dict()
    d["workload"] = {"num_requests": 1500, "clients": [{"arrival": {"process": "batch"},
                                                      "prompt_tokens": {"dist": "constant", "value": 512},
                                                      "output_tokens": {"dist": "constant", "value": 128}}]}
    p = write(tmp_path, d)
    tp1 = simulate(p).summary["output_throughput"]
    pp2 = simulate(load_config(p, ["engine.pipeline_parallel_size=2"])).summary["output_throughput"]
    assert pp2 > 1.3 * tp1


def test_tp2_per_token_by_hand_faster_than_tp1_and_reports_communication(tmp_path):
    p = write(tmp_path, cfg_dict())
    one = simulate(p).summary
    two = simulate(load_config(p, ["engine.tensor_parallel_size=2"])).summary
    # 8 requests of 32 + 128 tokens at once: one prefill of all, then 127 steps of 8 decodes, each
    # vLLM's CPU time (fixed, 8 sequences, 8 tokens) and a forward pass at that TP with vLLM's kernels.
    vllm = serving_profile("vllm")

    def cpu(tokens):
        return vllm.overhead_ms * 1e-3 + (8 * vllm.per_seq_us + tokens * vllm.per_token_us) * 1e-6

    for tp, s in ((1, one), (2, two)):
        cm = CostModel.create(LLAMA, "H100-SXM", tp=tp, profile=vllm.kernels(default_profile()))
        steps = [cpu(8) + cm.forward_time(np.full(8, 32 + j)).total_s for j in range(127)]
        assert s["mean_tpot_ms"] == pytest.approx(np.mean(steps) * 1e3, rel=1e-9)
        # Offline batch, one replica: the GPU is busy from the first batch to the last token, except
        # for the CPU time of each iteration.
        busy = s["compute_time_s"] + s["comm_time_s"] + cpu(8 * 32) + sum(cpu(8) for _ in range(127))
        assert busy == pytest.approx(s["duration"], rel=1e-9)
    assert two["mean_tpot_ms"] < one["mean_tpot_ms"]
    assert one["comm_time_s"] == 0 and two["comm_time_s"] > 0


def test_dp_n_replicas_at_n_times_the_rate_match_one_replica(tmp_path):
    base = {"simulation": {"seed": 3}, "model": LLAMA, "hardware": {"gpu": "H100-SXM"},
            "workload": {"num_requests": 3000, "clients": [{"arrival": {"process": "poisson", "rate": 3.0},
                                                           "dataset": {"name": "sharegpt"}}]}}
    one = simulate(write(tmp_path, base)).summary
    four = simulate(load_config(write(tmp_path, base), [
        "engine.data_parallel_size=4", "workload.clients.0.arrival.rate=12.0",
        "workload.num_requests=12000", "cluster.router=round_robin"])).summary
    for k in ("mean_tpot_ms", "median_tpot_ms", "mean_e2el_ms"):
        assert four[k] == pytest.approx(one[k], rel=0.1), k
    assert four["request_throughput"] == pytest.approx(4 * one["request_throughput"], rel=0.1)
    assert four["num_replicas"] == 4 and four["num_gpus"] == 4
    assert [r["requests"] for r in four["replicas"]] == [3000] * 4


def test_heterogeneous_pools(tmp_path):
    d = cfg_dict()
    d["workload"]["num_requests"] = 200
    d["workload"]["clients"][0]["arrival"] = {"process": "poisson", "rate": 20.0}
    d["cluster"] = {"router": "least_requests", "pools": [
        {"name": "h100", "count": 1, "gpu": "H100-SXM"},
        {"name": "a100", "count": 2, "gpu": "A100-SXM-80GB", "engine": {"tensor_parallel_size": 2}}]}
    s = simulate(write(tmp_path, d)).summary
    assert s["num_replicas"] == 3 and s["num_gpus"] == 5
    assert [r["gpu"] for r in s["replicas"]] == ["H100-SXM", "A100-SXM-80GB", "A100-SXM-80GB"]
    assert sum(r["requests"] for r in s["replicas"]) == 200 == s["completed"]


def test_memory_rejections_name_the_fix(tmp_path):
    p = write(tmp_path, cfg_dict())
    with pytest.raises(FastsimError, match=r"141.1 GB of weights.*H100-SXM.*tensor_parallel_size >= 2 fits"):
        simulate(load_config(p, ["model=meta-llama/Meta-Llama-3-70B"]))
    # Splitting the layers over two stages fits too.
    s = simulate(load_config(p, ["model=meta-llama/Meta-Llama-3-70B", "engine.pipeline_parallel_size=2"])).summary
    assert s["completed"] == 8
    with pytest.raises(FastsimError, match="pipeline_parallel_size = 100"):
        simulate(load_config(p, ["engine.pipeline_parallel_size=100"]))
    with pytest.raises(FastsimError, match=r"cluster.pools.0.engine.max_num_seqs = 0"):
        d = cfg_dict()
        d["cluster"] = {"pools": [{"engine": {"max_num_seqs": 0}}]}
        simulate(write(tmp_path, d))
