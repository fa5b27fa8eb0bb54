"""Disaggregated prefill/decode: one request by hand (prefill pass, KV transfer over the link,
decode steps), the overlap rule, invariants on a loaded 2P1D deployment, and config checks."""
import numpy as np
import pyarrow.compute as pc
import pytest

from fastsim.config import load_config
from fastsim.cost import CostModel
from fastsim.cost.profile import default_profile
from fastsim.cost.serving import serving_profile
from fastsim.errors import FastsimError
from fastsim.planning import plan_engines
from fastsim.simulation import simulate

VLLM = serving_profile("vllm")  # the engine's default framework: its kernels and CPU time per iteration
CM = CostModel.create("meta-llama/Meta-Llama-3-8B", "H100-SXM", profile=VLLM.kernels(default_profile()))


def cpu(tokens: int) -> float:
    """One request's iteration of `tokens` tokens: vLLM's CPU time before the forward pass."""
    return VLLM.overhead_ms * 1e-3 + (VLLM.per_seq_us + tokens * VLLM.per_token_us) * 1e-6


def one_request(prompt, output, *extra):
    return load_config(None, ["workload.clients=[{arrival: {process: batch}, prompt_tokens: {dist: constant, "
                              f"value: {prompt}}}, output_tokens: {{dist: constant, value: {output}}}}}]",
                              "workload.num_requests=1", *extra])


def fwd(dec=(), new=(), ctx=()):
    return CM.forward_time(np.array(dec, np.int64), np.array(new, np.int64), np.array(ctx, np.int64)).total_s


def test_one_request_by_hand_without_overlap():
    cfg = one_request(1000, 10, "cluster.disaggregation={prefill: {count: 1}, decode: {count: 1}, "
                      "kv_transfer: {link: ethernet, overlap: false}}")
    r = simulate(cfg).requests.to_pylist()[0]
    ttft = cpu(1000) + fwd(new=[1000], ctx=[0])
    # 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 128 KiB per token, over 12.5 GB/s, + 50 us
    move = 50e-6 + 1000 * 131072 / 12.5e9
    steps = [cpu(1) + fwd(dec=[1000 + j]) for j in range(9)]  # tokens 2..10 over 1000..1008 cached tokens
    assert r["ttft_ms"] == pytest.approx(ttft * 1e3, rel=1e-9)
    assert r["transfer_ms"] == pytest.approx(move * 1e3, rel=1e-9)
    assert r["decode_queue_ms"] == pytest.approx(0.0, abs=1e-9)
    assert r["e2el_ms"] == pytest.approx((ttft + move + sum(steps)) * 1e3, rel=1e-9)
    assert r["generated_tokens"] == 10 and r["status"] == "finished"
    assert (r["prefill_replica"], r["replica"]) == (0, 1)
    # the first inter-token gap spans the transfer: the decode pool's first token follows it
    assert r["max_itl_ms"] == pytest.approx((move + steps[0]) * 1e3, rel=1e-9)


def test_overlap_hides_what_the_prefill_outlasts():
    over = "cluster.disaggregation={prefill: {count: 1}, decode: {count: 1}, kv_transfer: {link: ethernet}}"
    r = simulate(one_request(1000, 10, over)).requests.to_pylist()[0]
    prefill_s = fwd(new=[1000], ctx=[0])
    move = 50e-6 + 1000 * 131072 / 12.5e9
    # the last layer's KV leaves when the pass ends: the exposed part is what outlasts the prefill
    exposed = max(50e-6, move - (prefill_s + cpu(1000)))
    assert r["transfer_ms"] == pytest.approx(exposed * 1e3, rel=1e-9)


def test_a_one_token_request_ends_at_its_prefill():
    r = simulate(one_request(500, 1, "cluster.disaggregation={prefill: {count: 1}, decode: {count: 1}}"))
    row = r.requests.to_pylist()[0]
    assert row["status"] == "finished" and row["generated_tokens"] == 1
    assert row["replica"] == row["prefill_replica"] == 0 and np.isnan(row["transfer_ms"])
    assert row["e2el_ms"] == row["ttft_ms"] == pytest.approx((cpu(500) + fwd(new=[500], ctx=[0])) * 1e3, rel=1e-9)


def test_loaded_deployment_invariants_and_where_the_time_went():
    cfg = load_config(None, ["workload.num_requests=400", "workload.clients.0.arrival.rate=8",
                             "cluster.disaggregation={prefill: {count: 2}, decode: {count: 1, engine: "
                             "{max_num_seqs: 64}}}"])
    res = simulate(cfg)
    t = res.requests.to_pandas()
    s = res.summary
    assert s["completed"] + s["rejected"] + s["unfinished"] == 400 and s["num_replicas"] == 3
    done = t[t.status == "finished"]
    assert (done.generated_tokens == done.output_tokens).all()
    assert (done.prefill_replica.isin([0, 1])).all() and (done.replica[done.output_tokens > 1] == 2).all()

    parts = (done.prefill_queue_ms + done.prefill_ms + done.transfer_ms + done.decode_queue_ms + done.decode_ms
             + done.api_server_ms)
    assert np.allclose(done.api_server_ms, VLLM.api_server_latency_ms, rtol=1e-12)  # Poisson clients: online
    many = done.output_tokens > 1
    np.testing.assert_allclose(parts[many], done.e2el_ms[many], rtol=1e-9)
    assert (done[["prefill_queue_ms", "prefill_ms", "transfer_ms", "decode_queue_ms"]][many] >= -1e-9).all().all()
    assert done.decode_queue_ms.max() > 0  # 64 decode slots for 8 requests/s of long chats: a queue
    assert s["peak_kv_blocks_used"] <= max(r["num_gpu_blocks"] for r in s["replicas"])
    fast = simulate(load_config(None, ["workload.num_requests=400", "workload.clients.0.arrival.rate=8",
                                       "simulation.mode=exact", "cluster.disaggregation={prefill: {count: 2}, "
                                       "decode: {count: 1, engine: {max_num_seqs: 64}}}"])).requests
    np.testing.assert_allclose(pc.fill_null(fast.column("finish_s"), np.nan).to_numpy(zero_copy_only=False),
                               t.finish_s.to_numpy(), rtol=1e-9)


def test_config_checks():
    dis = "cluster.disaggregation={prefill: {count: 1}, decode: {count: 1}}"
    with pytest.raises(FastsimError, match="not both"):
        load_config(None, [dis, "cluster.pools=[{count: 1}]"])
    with pytest.raises(FastsimError, match="prefix caching"):
        plan_engines(load_config(None, [dis, "engine.enable_prefix_caching=true"]))
    with pytest.raises(FastsimError, match="conversation"):
        plan_engines(load_config(None, [dis, "workload.clients.0.conversation={turns: {dist: constant, value: 3}, "
                                             "think_time_s: {dist: constant, value: 1.0}}"]))
