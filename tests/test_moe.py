"""MoE: expert reads by batch size, expert parallelism, skewed routing, MLA; each against hand figures."""
import numpy as np
import pytest
import reference as ref
from hypothesis import given
from hypothesis import strategies as st

from fastsim.catalog import load_gpu, load_model
from fastsim.config import Engine, load_config
from fastsim.cost import CostModel
from fastsim.engine import cost_nb as nb
from fastsim.errors import FastsimError
from fastsim.memory import memory_plan
from fastsim.simulation import simulate

MIXTRAL = "mistralai/Mixtral-8x7B-v0.1"
H, INTER, LAYERS = 4096, 14336, 32
EXPERT_BYTES = 3 * H * INTER * 2  # one expert's gate, up and down projections in BF16


def hand_expert_gemm(cm, active, routed, inter=INTER):
    """One MoE layer's grouped expert GEMM from the profile and datasheet, by hand."""
    prof, gpu = cm.profile, cm.gpu
    flops = routed * 6 * H * inter
    nbytes = active * 3 * H * inter * 2 + routed * (2 * H + 3 * inter) * 2
    tc = flops / (gpu.bf16_tflops * 1e12 * prof.compute_efficiency)
    tm = nbytes / (gpu.mem_bw_gb_s * 1e9 * prof.bandwidth_efficiency)
    return prof.gemm_latency_us * 1e-6 + (tc ** prof.overlap + tm ** prof.overlap) ** (1 / prof.overlap)


def test_mixtral_batch1_reads_two_experts_batch256_all_eight():
    cm = CostModel.create(MIXTRAL, "H100-SXM")
    # Batch 1: the one token reads exactly its 2 experts. Batch 256: 8 (1 - (6/8)^256) = 8 - 1e-31.
    assert nb.moe_layer_time_nb(cm.params, 1) == pytest.approx(hand_expert_gemm(cm, 2, 2), rel=1e-12)
    assert nb.moe_layer_time_nb(cm.params, 256) == pytest.approx(hand_expert_gemm(cm, 8, 512), rel=1e-12)
    # The per-step time shows it: going from 1 to 256 decodes adds at least the 6 more experts'
    # weights of every layer at datasheet bandwidth, and batch 1 reads no more than ~2 experts' worth.
    t1, t256 = cm.forward_time([100]).total_s, cm.forward_time([100] * 256).total_s
    six_more = LAYERS * 6 * EXPERT_BYTES / 3350e9
    assert t256 - t1 > six_more
    non_expert = (load_model(MIXTRAL).weight_bytes() - LAYERS * 8 * EXPERT_BYTES - 32000 * H * 2) / 3350e9
    assert t1 < 1.8 * (non_expert + LAYERS * 2 * EXPERT_BYTES / 3350e9)


def test_expert_parallel_spreads_experts_and_adds_all_to_all():
    """TP 1 x DP 8 with EP: one whole expert per GPU; the 8 replicas' tokens meet in every MoE layer."""
    cm = CostModel.create(MIXTRAL, "H100-SXM", tp=1, dp=8, enable_expert_parallel=True)
    assert cm.expert_parallel_size == 8
    # 4 tokens per replica -> 32 tokens in the layer, 64 routed copies, 8 per GPU; this GPU's one
    # expert is hit with probability 1 - (1 - 2/8)^32.
    active = 1 - 0.75 ** 32
    assert nb.moe_layer_time_nb(cm.params, 4) == pytest.approx(hand_expert_gemm(cm, active, 8), rel=1e-12)
    # All-to-all: dispatch and combine per MoE layer, each sending 7/8 of 4 x 2 routed hidden states.
    prof = cm.profile
    link = 450e9 * prof.link_efficiency
    a2a = 2 * (prof.allreduce_latency_us * 1e-6 + 4 * 2 * H * 2 * 7 / 8 / link)
    assert nb.token_comm_nb(cm.params, 4) == pytest.approx(LAYERS * a2a, rel=1e-12)
    assert nb.token_comm_nb(CostModel.create(MIXTRAL, "H100-SXM").params, 4) == 0.0


def test_expert_parallel_memory_holds_one_expert_share_per_gpu():
    model, gpu = load_model(MIXTRAL), load_gpu("H100-SXM")
    tp_only = memory_plan(model, gpu, Engine(tensor_parallel_size=2, data_parallel_size=2))
    ep = memory_plan(model, gpu, Engine(tensor_parallel_size=2, data_parallel_size=2, enable_expert_parallel=True))
    experts = LAYERS * 8 * EXPERT_BYTES
    assert tp_only.weight_bytes == pytest.approx(model.weight_bytes() / 2, rel=1e-12)
    assert ep.weight_bytes == pytest.approx((model.weight_bytes() - experts) / 2 + experts / 4, rel=1e-12)
    assert ep.num_gpu_blocks > tp_only.num_gpu_blocks
    with pytest.raises(FastsimError, match="experts do not split evenly"):
        memory_plan(model, gpu, Engine(tensor_parallel_size=1, data_parallel_size=3, enable_expert_parallel=True))


def test_skewed_routing_against_monte_carlo():
    """Top-1 routing over 16 experts with Zipf(1) popularity: expected distinct experts hit, by
    sampling, matches the closed form the kernel uses (exact for k = 1)."""
    spec = load_model(MIXTRAL).model_copy(update={"num_local_experts": 16, "num_experts_per_tok": 1})
    cm = CostModel.create(spec, "H100-SXM", expert_routing_skew=1.0)
    pop = 1 / np.arange(1, 17)
    pop /= pop.sum()
    rng = np.random.default_rng(0)
    for tokens in (1, 4, 32):
        hits = np.mean([len(set(rng.choice(16, size=tokens, p=pop))) for _ in range(4000)])
        inter = INTER
        want = hand_expert_gemm(cm, hits, tokens, inter)
        assert nb.moe_layer_time_nb(cm.params, tokens) == pytest.approx(want, rel=0.02)
    balanced = CostModel.create(spec, "H100-SXM")
    # Skew concentrates tokens on fewer experts: fewer weights read at a moderate batch.
    assert nb.moe_layer_time_nb(cm.params, 8) < nb.moe_layer_time_nb(balanced.params, 8)


def test_skew_under_expert_parallelism_waits_for_the_hot_gpu():
    bal = CostModel.create(MIXTRAL, "H100-SXM", dp=8, enable_expert_parallel=True)
    hot = CostModel.create(MIXTRAL, "H100-SXM", dp=8, enable_expert_parallel=True, expert_routing_skew=1.0)
    # Large batch: compute bound, and GPU 0 (experts ranked most popular) gets more than 1/8 of them.
    tokens = 2048
    n = tokens * 8
    pop = 1 / np.arange(1, 9)
    pop /= pop.sum()
    q0 = min(1.0, 2 * pop[0])
    assert nb.moe_layer_time_nb(hot.params, tokens) == pytest.approx(
        hand_expert_gemm(hot, 1 - (1 - q0) ** n, n * q0), rel=1e-12)
    assert nb.moe_layer_time_nb(hot.params, tokens) > 1.5 * nb.moe_layer_time_nb(bal.params, tokens)


def test_deepseek_v3_shapes_and_mla_cache():
    m = load_model("deepseek-ai/DeepSeek-V3")
    # DeepSeek's published figures: 671B parameters, 37B activated per token.
    assert m.num_params / 1e9 == pytest.approx(671, rel=0.01)
    assert m.num_active_params / 1e9 == pytest.approx(37, rel=0.03)
    assert m.is_mla and m.moe_layers == 58 and m.first_k_dense_replace == 3
    # The cache holds a 512-wide latent and a 64-wide rotary key per layer: 61 x 576 x 2 bytes,
    # on every TP rank (not split like KV heads).
    assert m.kv_bytes_per_token("bf16") == 61 * 576 * 2
    cm = CostModel.create(m, "H200-SXM", tp=8, dtype="fp8", kv_cache_dtype="fp8")
    assert cm.params[nb.KV_BYTES_PER_TOKEN] == 576
    # Decode attends over the latent (scores over 576, values over 512 per head); prefill over
    # decompressed heads (192-wide keys, 128-wide values): per pair per layer, 16 heads per GPU.
    assert cm.params[nb.ATTN_FLOPS_PER_PAIR] == 2 * 16 * (576 + 512)
    assert cm.params[nb.ATTN_PREFILL_FLOPS_PER_PAIR] == 2 * 16 * (192 + 128)
    assert cm.params[nb.MOE_LAYERS] == 58
    # 3 dense layers' MLP (18432 wide, split 8 ways) live in the ops table.
    dense = [r for r in cm.ops if r[nb.OP_LAYERS] == 3]
    assert sorted(r[nb.OP_FLOPS_PER_TOKEN] for r in dense) == [2 * 2304 * 7168, 2 * 7168 * 4608]


def test_moe_catalog_matches_published_sizes():
    for name, total, active in (("Qwen/Qwen3-30B-A3B", 30.5, 3.3), ("Qwen/Qwen1.5-MoE-A2.7B", 14.3, 2.7),
                                ("deepseek-ai/DeepSeek-V2-Lite", 15.7, 2.66)):
        m = load_model(name)
        assert m.num_params / 1e9 == pytest.approx(total, rel=0.02)
        assert m.num_active_params / 1e9 == pytest.approx(active, rel=0.03)


def test_deepseek_v3_does_not_fit_eight_h100_but_fits_eight_h200():
    m = load_model("deepseek-ai/DeepSeek-V3")
    # 669.2 B parameters in FP8 and the 2 x 129280 x 7168 embedding / LM head in 16 bits: 672.9 GB,
    # 84.1 GB per GPU at TP 8.
    with pytest.raises(FastsimError, match=r"needs 672.9 GB of weights \(84.1 GB per GPU"):
        memory_plan(m, load_gpu("H100-SXM"), Engine(tensor_parallel_size=8, dtype="fp8", max_model_len=8192))
    plan = memory_plan(m, load_gpu("H200-SXM"), Engine(tensor_parallel_size=8, dtype="fp8", kv_cache_dtype="fp8",
                                                   max_model_len=8192))
    assert plan.kv_bytes_per_token == 61 * 576


@pytest.mark.parametrize("engine", [[], ["engine.enable_expert_parallel=true", "engine.data_parallel_size=2"],
                                    ["engine.expert_routing_skew=0.8"]])
def test_moe_models_simulate(engine):
    cfg = load_config(None, ["model=Qwen/Qwen3-30B-A3B", "workload.num_requests=60"] + engine)
    s = simulate(cfg).summary
    assert s["completed"] == 60 and s["mean_tpot_ms"] > 0


@given(tokens=st.integers(1, 5000), tp=st.sampled_from([1, 2]), dp=st.sampled_from([1, 2, 4]),
       ep=st.booleans(), skew=st.sampled_from([0.0, 0.5, 1.3]))
def test_moe_layer_matches_reference(tokens, tp, dp, ep, skew):
    cm = CostModel.create(MIXTRAL, "H100-SXM", tp=tp, dp=dp, enable_expert_parallel=ep, expert_routing_skew=skew)
    want = ref.moe_layer_time(cm.model, cm.gpu, cm.profile, tokens, tp, dp, ep, skew)
    assert nb.moe_layer_time_nb(cm.params, tokens) == pytest.approx(want, rel=1e-9)
