"""Speculative decoding: tokens per step, the verify pass and drafter by hand, one request through the
engine by hand, memory of the drafter, the batch size where speculation stops paying, config checks."""
import numpy as np
import pytest
import reference as ref
from hypothesis import given
from hypothesis import strategies as st

from fastsim.catalog import load_gpu, load_model
from fastsim.config import Engine, SpeculativeConfig, load_config
from fastsim.cost import CostModel
from fastsim.cost.profile import default_profile
from fastsim.cost.serving import serving_profile
from fastsim.cost.speculative import decode_step_s, speculative_cost_model
from fastsim.engine import cost_nb as nb
from fastsim.engine.bundles import Batch
from fastsim.errors import FastsimError
from fastsim.memory import memory_plan
from fastsim.simulation import simulate

LLAMA = "meta-llama/Llama-3.1-8B"
CM = CostModel.create(LLAMA, "H100-SXM")
OVERHEAD = 0.33e-3
VLLM = serving_profile("vllm")  # the engine's default framework: its kernels and CPU time per iteration
VLLM_CM = CostModel.create(LLAMA, "H100-SXM", profile=VLLM.kernels(default_profile()))


def cpu(tokens: int) -> float:
    """One request's engine step of `tokens` tokens: vLLM's CPU time (fixed + per sequence + per token)."""
    return VLLM.overhead_ms * 1e-3 + (VLLM.per_seq_us + tokens * VLLM.per_token_us) * 1e-6


def spec(**kw):
    return SpeculativeConfig(**({"method": "ngram", "num_speculative_tokens": 4, "acceptance_rate": 0.8} | kw))


def test_expected_tokens_per_step_by_hand():
    assert spec().expected_tokens_per_step == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.4096)  # 3.3616
    probs = spec(num_speculative_tokens=2, acceptance_rate=None, acceptance_probs=[0.9, 0.5])
    assert probs.expected_tokens_per_step == pytest.approx(1 + 0.9 + 0.9 * 0.5)
    assert spec(acceptance_rate=0.0).expected_tokens_per_step == 1.0
    assert spec(acceptance_rate=1.0).expected_tokens_per_step == 5.0


def test_verify_attention_reads_the_cache_once_for_all_queries():
    p, prof, gpu = CM.params, CM.profile, CM.gpu
    n, keys, q = 3, 3 * 1001.0, 5.0
    pairs = q * keys + n * q * (q - 1) / 2  # each of 5 queries sees one key more than the one before
    heads, hd = 32, 128
    tc = pairs * 4 * heads * hd / (gpu.bf16_tflops * 1e12 * prof.attention_efficiency)
    tm = (keys * 8 * hd * 2 * 2 + n * q * 2 * heads * hd * 2) / (gpu.mem_bw_gb_s * 1e9 * prof.attention_bandwidth_efficiency)
    want = prof.attention_latency_us * 1e-6 + (tc ** prof.overlap + tm ** prof.overlap) ** (1 / prof.overlap)
    assert nb.verify_attention_time_nb(p, n, keys, q) == pytest.approx(want, rel=1e-12)
    # One query per decode is the ordinary decode, bit for bit.
    assert nb.verify_attention_time_nb(p, n, keys, 1.0) == nb.attention_time_nb(p, n, keys, 0, 0.0, 0.0, 0)


def pass_time(p, tokens, rows, n_dec, keys, queries, n_pre=0, pairs=0.0, pre_keys=0.0, pre_tokens=0):
    """A forward pass from its parts: GEMMs and all-reduces by token count, LM head by rows, attention."""
    layers = nb.token_compute_nb(p, CM.ops, tokens) + nb.token_comm_nb(p, tokens)
    head = nb.seq_compute_nb(p, rows) + nb.seq_comm_nb(p, rows)
    attention = (nb.attention_time_nb(p, 0, 0.0, n_pre, pairs, pre_keys, pre_tokens)
                 + nb.verify_attention_time_nb(p, n_dec, keys, queries))
    return layers + head + p[nb.LAYERS] * attention


def test_iteration_is_one_over_e_of_a_verify_step():
    params, tok, seq = speculative_cost_model(CM, spec(), 256, 8192, OVERHEAD)
    e = 3.3616
    assert params[nb.FRAMEWORK_OVERHEAD_S] == pytest.approx(OVERHEAD / e)
    # 8 decodes at 500 cached tokens: one pass verifies 8 x 5 tokens (n-gram drafts cost no GPU time).
    agg = Batch(8, 8 * 501.0, 0, 0, 0.0, 0.0)
    body, head = nb.stage_time_nb(params, tok, seq, 0, 0, agg)
    assert body + head == pytest.approx(pass_time(CM.params, 40, 40, 8, 8 * 501.0, 5.0) / e, rel=1e-12)
    # With a prefill chunk of 300 after 200 cached: the chunk's own pass in full, the decodes' addition / E.
    pairs = nb.chunk_pairs_nb(300, 200, 0)
    mixed = Batch(8, 8 * 501.0, 1, 300, pairs, 500.0)
    body, head = nb.stage_time_nb(params, tok, seq, 0, 0, mixed)
    alone = pass_time(CM.params, 300, 1, 0, 0.0, 1.0, 1, pairs, 500.0, 300)
    step = pass_time(CM.params, 340, 41, 8, 8 * 501.0, 5.0, 1, pairs, 500.0, 300)
    assert body + head == pytest.approx(alone + (step - alone) / e, rel=1e-12)
    # A prefill-only iteration costs what it costs without speculation.
    base_p, base_tok, base_seq = speculative_cost_model(CM, None, 256, 8192, OVERHEAD)
    only = Batch(0, 0.0, 1, 300, pairs, 500.0)
    assert nb.stage_time_nb(params, tok, seq, 0, 0, only) == nb.stage_time_nb(base_p, base_tok, base_seq, 0, 0, only)


def test_draft_model_passes_and_eagle_head():
    draft = CostModel.create("Qwen/Qwen2.5-1.5B", "H100-SXM")
    params, tok, seq = speculative_cost_model(CM, spec(method="draft_model", model="Qwen/Qwen2.5-1.5B"), 64, 8192,
                                              OVERHEAD)
    # Row 2: four draft decode passes of the 1.5B model (its GEMMs and LM head) by batch size.
    for n in (1, 7, 64):
        want = 4 * (nb.token_compute_nb(draft.params, draft.ops, n) + nb.seq_compute_nb(draft.params, n))
        assert seq[2, n] == pytest.approx(want, rel=1e-12)
    # Its attention: 28 layers x 2 KV heads x 128 x 2 x 2 bytes against the target's 32 x 8 x 128 x 2 x 2.
    assert params[nb.SPEC_DRAFT_ATTN] == pytest.approx(28 * 2 / (32 * 8))
    eagle_p, _, eagle_seq = speculative_cost_model(CM, spec(method="eagle"), 64, 8192, OVERHEAD)
    one_layer = CostModel.create(LLAMA, "H100-SXM", layers=1)
    assert eagle_seq[2, 10] == pytest.approx(4 * (nb.token_compute_nb(one_layer.params, one_layer.ops, 10)
                                                  + nb.seq_compute_nb(one_layer.params, 10)), rel=1e-12)
    assert eagle_p[nb.SPEC_DRAFT_ATTN] == pytest.approx(1 / 32)


def test_drafter_memory():
    model, gpu = load_model(LLAMA), load_gpu("H100-SXM")
    plain = memory_plan(model, gpu, Engine())
    draft = memory_plan(model, gpu, Engine(speculative_config=spec(method="draft_model", model="Qwen/Qwen2.5-1.5B")))
    assert draft.weight_bytes - plain.weight_bytes == pytest.approx(load_model("Qwen/Qwen2.5-1.5B").weight_bytes())
    # The draft's KV shares the target's blocks: 28 x 2 x 128 x 2 x 2 bytes more per token.
    assert draft.kv_bytes_per_token == plain.kv_bytes_per_token + 28 * 2 * 128 * 2 * 2
    eagle = memory_plan(model, gpu, Engine(speculative_config=spec(method="eagle")))
    assert eagle.kv_bytes_per_token == plain.kv_bytes_per_token * 33 / 32
    assert eagle.weight_bytes - plain.weight_bytes == pytest.approx(model.weight_bytes() / 32)
    assert memory_plan(model, gpu, Engine(speculative_config=spec())).num_gpu_blocks == plain.num_gpu_blocks


def test_one_request_through_the_engine_by_hand():
    cfg = load_config(None, [
        "workload.clients=[{arrival: {process: batch}, prompt_tokens: {dist: constant, value: 100}, "
        "output_tokens: {dist: constant, value: 20}}]", "workload.num_requests=1", f"model={LLAMA}",
        "engine.speculative_config={method: ngram, num_speculative_tokens: 4, acceptance_rate: 0.8}"])
    for mode in ("exact", "fast"):
        r = simulate(cfg.model_copy(update={"simulation": cfg.simulation.model_copy(update={"mode": mode})})
                     ).requests.to_pylist()[0]
        e = 3.3616
        # A prefill-only iteration (no decodes to verify) carries 1/E of a step's CPU time; a decode
        # step verifies 5 tokens of one sequence.
        ttft = cpu(100) / e + VLLM_CM.forward_time([], [100], [0]).total_s
        steps = [(cpu(1) + pass_time(VLLM_CM.params, 5, 5, 1, 100.0 + j + 1, 5.0)) / e for j in range(19)]
        assert r["ttft_ms"] == pytest.approx(ttft * 1e3, rel=1e-9)
        assert r["e2el_ms"] == pytest.approx((ttft + sum(steps)) * 1e3, rel=1e-9)
        assert r["generated_tokens"] == 20


def test_speculation_pays_at_batch_one_and_stops_at_high_batch():
    """Acceptance 0.8 with 4 tokens: per-token time falls ~3x at batch 1 (weights read once per step
    for ~3.4 tokens) and rises once the verify pass (5 tokens per sequence) is compute bound."""
    base = speculative_cost_model(CM, None, 1024, 8192, OVERHEAD)
    for method, model in (("ngram", None), ("eagle", None), ("draft_model", "Qwen/Qwen2.5-1.5B")):
        s = speculative_cost_model(CM, spec(method=method, model=model), 1024, 8192, OVERHEAD)
        assert decode_step_s(*s, 1, 256) < 0.8 * decode_step_s(*base, 1, 256)
        assert decode_step_s(*s, 1024, 256) > decode_step_s(*base, 1024, 256)


def test_fast_mode_matches_exact_with_speculation():
    over = [f"model={LLAMA}", "workload.num_requests=300", "workload.clients.0.arrival.rate=20",
            "engine.speculative_config={method: eagle, num_speculative_tokens: 3, acceptance_probs: [0.9, 0.7, 0.5]}"]
    fast = simulate(load_config(None, over)).requests
    exact = simulate(load_config(None, over + ["simulation.mode=exact"])).requests
    assert fast.column("status").to_pylist() == exact.column("status").to_pylist()
    np.testing.assert_allclose(fast.column("e2el_ms").to_numpy(), exact.column("e2el_ms").to_numpy(), rtol=1e-9)


@pytest.mark.parametrize("bad,match", [
    ("{method: ngram, num_speculative_tokens: 4}", "acceptance_rate"),
    ("{method: draft_model, num_speculative_tokens: 4, acceptance_rate: 0.7}", "needs `model`"),
    ("{method: ngram, num_speculative_tokens: 2, acceptance_probs: [0.5]}", "one per token"),
    ("{method: ngram, num_speculative_tokens: 4, acceptance_rate: 1.5}", "acceptance_rate"),
    ("{method: eagle, model: Qwen/Qwen2.5-1.5B, num_speculative_tokens: 4, acceptance_rate: 0.7}", "drop `model`"),
])
def test_bad_speculative_config_gets_one_line(bad, match):
    with pytest.raises(FastsimError, match=match) as e:
        load_config(None, [f"engine.speculative_config={bad}"])
    assert "\n" not in str(e.value) and "speculative_config" in str(e.value)
    with pytest.raises(FastsimError, match="pipeline_parallel_size"):
        load_config(None, ["engine.speculative_config={method: ngram, num_speculative_tokens: 2, acceptance_rate: 0.5}",
                           "engine.pipeline_parallel_size=2"])


@given(contexts=st.lists(st.integers(0, 8000), min_size=1, max_size=20), queries=st.integers(1, 8),
       tp=st.sampled_from([1, 2, 4]))
def test_verify_attention_matches_reference(contexts, queries, tp):
    cm = CostModel.create(LLAMA, "H100-SXM", tp=tp)
    keys = float(sum(c + 1 for c in contexts))
    want = ref.verify_attention_time(cm.model, cm.gpu, cm.profile, contexts, queries, tp)
    assert nb.verify_attention_time_nb(cm.params, len(contexts), keys, float(queries)) == pytest.approx(want, rel=1e-9)
