"""NVIDIA Dynamo: the KV-aware router by hand, its limit cases, and Dynamo's disaggregated serving
with prefix caching in the prefill pool."""
import numpy as np
import pytest

from fastsim.config import Engine, load_config
from fastsim.errors import FastsimError
from fastsim.planning import plan_engines, router_for
from fastsim.simulation import simulate

SYSTEM = ("workload.clients=[{arrival: {process: constant, rate: 1.0}, system_prompt_tokens: 1600, "
          "prompt_tokens: {dist: constant, value: 16}, output_tokens: {dist: constant, value: 1000}}]")


def test_kv_router_by_hand():
    """A (1616 tokens: a 1600-token system prompt + 16) runs on replica 0 from t = 0; B, the same
    prompt, arrives at t = 1 s while A decodes (~1616 + 130 tokens = 110 blocks of 16 in use).
    Cost = w x blocks B must prefill + blocks in use + B's 101 blocks:
    replica 0: w x 1 + 110 + 101, replica 1: w x 101 + 0 + 101. w = 1: 212 > 202, replica 1;
    w = 2: 213 < 303, replica 0, where B finds A's 100 system-prompt blocks cached."""
    base = ["engine.framework=dynamo", "engine.data_parallel_size=2", "workload.num_requests=2", SYSTEM]
    for w, replica, cached in ((1.0, 1, 0), (2.0, 0, 1600)):
        rows = simulate(load_config(None, base + [f"cluster.kv_overlap_score_weight={w}"])).requests.to_pylist()
        assert [(r["arrival_s"], r["replica"]) for r in rows] == [(0.0, 0), (1.0, replica)]
        assert rows[1]["cached_tokens"] == cached


def test_kv_router_without_overlap_weight_is_least_kv():
    """Weight 0 leaves blocks in use (+ the request's own, the same everywhere): least_kv's order,
    ties to fewer outstanding requests, then the lower index."""
    over = ["engine.enable_prefix_caching=true", "engine.data_parallel_size=3", "workload.num_requests=400",
            "workload.clients.0.arrival.rate=12"]
    kv = simulate(load_config(None, over + ["cluster.router=kv_aware", "cluster.kv_overlap_score_weight=0"]))
    least = simulate(load_config(None, over + ["cluster.router=least_kv"]))
    assert kv.requests.column("replica").to_pylist() == least.requests.column("replica").to_pylist()


def test_dynamo_defaults():
    e = Engine(framework="dynamo")
    assert e.enable_prefix_caching
    cfg = load_config(None, ["engine.framework=dynamo"])
    assert router_for(cfg, cfg.engine) == "kv_aware"
    explicit = load_config(None, ["engine.framework=dynamo", "cluster.router=round_robin"])
    assert router_for(explicit, explicit.engine) == "round_robin"
    assert router_for(load_config(None, []), Engine()) == "round_robin"


# Eight clients, each with its own 3000-token system prompt; a prefill cache of 1500 16-token blocks
# holds about six such prompts besides the work in flight, so where a request goes decides whether it hits.
DISAGG = ["engine.framework=dynamo", "workload.num_requests=600", "model=meta-llama/Llama-3.1-8B",
          "engine.max_model_len=16384",
          "cluster.disaggregation={prefill: {count: 2, engine: {num_gpu_blocks_override: 1500}}, "
          "decode: {count: 2}, kv_transfer: {link: nvlink}}",
          "workload.clients=[" + ", ".join(
              f"{{name: c{k}, arrival: {{process: poisson, rate: 1.0}}, system_prompt_tokens: 3000, "
              "dataset: {name: sharegpt}}" for k in range(8)) + "]"]


def test_dynamo_disaggregated_caches_in_the_prefill_pool():
    _, _, plans = plan_engines(load_config(None, DISAGG))
    prefill, decode = plans[0][1]
    assert prefill.engine.enable_prefix_caching and not decode.engine.enable_prefix_caching
    fast = simulate(load_config(None, DISAGG))
    exact = simulate(load_config(None, DISAGG + ["simulation.mode=exact"]))
    rr = simulate(load_config(None, DISAGG + ["cluster.disaggregation.prefill_router=round_robin"]))
    t = fast.requests.to_pandas()
    assert (t.status == "finished").all() and t.cached_tokens.max() >= 2992
    assert np.allclose(t.e2el_ms, exact.requests.to_pandas().e2el_ms, rtol=1e-9)
    # Routing by cache keeps each client's system prompt on fewer prefill replicas: more hits.
    assert fast.summary["prefix_cache_hit_rate"] > rr.summary["prefix_cache_hit_rate"]
    # The KV still moves whole: every prompt token, cached or not, reaches the decode pool.
    assert np.allclose(t.transfer_ms.dropna() > 0, True)


def test_decode_pool_cache_is_refused():
    with pytest.raises(FastsimError, match="prefix caching in the decode pool is not modelled"):
        plan_engines(load_config(None, [
            "cluster.disaggregation={prefill: {count: 1}, decode: {count: 1, engine: {enable_prefix_caching: true}}}"]))
