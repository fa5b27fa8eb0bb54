from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from fastsim.catalog import load_model
from fastsim.cost import CostModel, CostProfile, default_profile
from fastsim.engine import cost_nb as nb

LLAMA3 = "meta-llama/Meta-Llama-3-8B"


def test_single_gemm_by_hand():
    # A pure roofline (huge p = max) with no latency: a 1 x 4096 x 4096 GEMM is memory bound.
    prof = CostProfile(compute_efficiency=0.5, bandwidth_efficiency=0.5, overlap=64, gemm_latency_us=0)
    cm = CostModel.create(LLAMA3, "H100-SXM", profile=prof)
    nbytes = 4096 * 4096 * 2 + (4096 + 4096) * 2
    assert cm.gemm_time(1, 4096, 4096) == pytest.approx(nbytes / (3350e9 * 0.5), rel=1e-6)
    # 8192^3 is compute bound: 2 * 8192^3 FLOPs at half of 989.4 TFLOP/s.
    assert cm.gemm_time(8192, 8192, 8192) == pytest.approx(2 * 8192**3 / (989.4e12 * 0.5), rel=1e-6)


def test_roofline_soft_max_between_max_and_sum():
    for p in (1.0, 2.0, 4.0):
        t = nb.roofline_nb(3.0, 4.0, 1.0, 1.0, p)
        assert 4.0 <= t <= 7.0 + 1e-12
    assert nb.roofline_nb(3.0, 4.0, 1.0, 1.0, 1.0) == pytest.approx(7.0)
    assert nb.roofline_nb(3.0, 4.0, 1.0, 1.0, 2.0) == pytest.approx(5.0)


@given(hi=st.floats(1e-9, 10.0), ratio=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.1, 0.0999999, 0.1000001])),
       swap=st.booleans())
def test_soft_max_at_p4_is_the_fourth_root_of_the_sum_of_fourth_powers(hi, ratio, swap):
    """The default overlap's closed form agrees with the fourth root of the exact sum to rounding, for
    bounds far apart (memory-bound decode attention) and close, either bound the larger."""
    lo = hi * ratio
    tc, tm = (lo, hi) if swap else (hi, lo)
    want = float((Fraction(tc) ** 4 + Fraction(tm) ** 4) ** 0.25) if lo > 0 else hi
    assert nb.soft_max_nb(tc, tm, 4.0) == pytest.approx(want, rel=5e-16)


def test_decode_step_is_weight_read_bound():
    """Batch-1 decode reads every weight once: time >= weight bytes / datasheet bandwidth."""
    cm = CostModel.create(LLAMA3, "H100-SXM")
    t = cm.forward_time([100]).total_s
    weights = load_model(LLAMA3).weight_bytes("bf16") - 128256 * 4096 * 2  # embedding is not read
    # Kernel floors and elementwise traffic add ~2/3 on top (measured on H100: 7.43 ms at batch 1).
    assert weights / 3350e9 < t < 1.8 * weights / 3350e9


@pytest.mark.parametrize("model,tp,dtype", [
    (LLAMA3, 1, "bf16"), (LLAMA3, 2, "fp8"), ("meta-llama/Llama-2-7b-hf", 4, "bf16"),
    ("mistralai/Mixtral-8x7B-v0.1", 2, "bf16"), ("mistralai/Mistral-7B-v0.1", 1, "int4"),
    ("Qwen/Qwen2.5-1.5B", 4, "bf16"),
])
@given(dec=st.lists(st.integers(0, 9000), max_size=12),
       pre=st.lists(st.tuples(st.integers(0, 700), st.integers(0, 6000)), max_size=4))
def test_forward_time_matches_reference(model, tp, dtype, dec, pre):
    cm = CostModel.create(model, "H100-SXM", tp=tp, dtype=dtype)
    new = np.array([n for n, _ in pre], dtype=np.int64)
    ctx = np.array([c for _, c in pre], dtype=np.int64)
    got = cm.forward_time(np.array(dec, dtype=np.int64), new, ctx)
    want_compute, want_comm = ref.forward_time(cm.model, cm.gpu, cm.profile, dec, new.tolist(), ctx.tolist(),
                                               tp=tp, dtype=dtype, kv_dtype=cm.kv_cache_dtype)
    assert ref.isclose(got.compute_s, want_compute, 1e-9)
    assert ref.isclose(got.comm_s, want_comm, 1e-9)
    assert got.total_s == got.compute_s + got.comm_s


@given(new=st.integers(0, 300), ctx=st.integers(0, 300), window=st.integers(0, 400))
def test_prefill_pairs_closed_form(new, ctx, window):
    brute = sum(min(m, window) if window else m for m in range(ctx + 1, ctx + new + 1))
    assert nb.chunk_pairs_nb(new, ctx, window) == brute


def test_empty_batch_costs_nothing():
    cm = CostModel.create(LLAMA3, "H100-SXM")
    assert cm.forward_time([], [], []).total_s == 0.0


def test_tp2_halves_sharded_compute_and_adds_comm():
    one = CostModel.create(LLAMA3, "H100-SXM", tp=1)
    two = CostModel.create(LLAMA3, "H100-SXM", tp=2)
    # Large prefill: compute bound, so the sharded GEMMs take about half the time per GPU.
    args = ([], [8192], [0])
    t1, t2 = one.forward_time(*args), two.forward_time(*args)
    assert t1.comm_s == 0.0 and t2.comm_s > 0.0
    assert 0.45 < t2.compute_s / t1.compute_s < 0.6
    # All-reduce: 2 per layer of 8192 x 4096 x 2 bytes; a ring of 2 moves half of it twice.
    link = 450e9 * two.profile.link_efficiency
    per = two.profile.allreduce_latency_us * 1e-6 + 2 * (8192 * 4096 * 2 / 2 / link + two.profile.link_latency_us * 1e-6)
    gather = 0.5 * 128256 * 2 / link + two.profile.link_latency_us * 1e-6
    assert t2.comm_s == pytest.approx(32 * 2 * per + gather, rel=1e-9)


def test_decode_attention_grows_with_context():
    cm = CostModel.create(LLAMA3, "H100-SXM")
    short, long = cm.forward_time([128] * 64).total_s, cm.forward_time([8192] * 64).total_s
    # 64 x 8064 extra tokens x 128 KiB of KV each must be read at no more than datasheet bandwidth.
    assert long - short > 64 * 8064 * 131072 / 3350e9


def test_gqa_reads_less_kv_than_mha():
    gqa = CostModel.create("mistralai/Mistral-7B-v0.1", "H100-SXM").attention_time([3000] * 64)
    mha = CostModel.create("meta-llama/Llama-2-7b-hf", "H100-SXM").attention_time([3000] * 64)
    assert mha > 3 * gqa


def test_sliding_window_caps_attention():
    mistral = CostModel.create("mistralai/Mistral-7B-v0.1", "H100-SXM")  # window 4096
    assert mistral.attention_time([20000]) == mistral.attention_time([5000])


def test_moe_expected_active_experts_vs_monte_carlo():
    rng = np.random.default_rng(0)
    for tokens in (1, 3, 16):
        mc = ref.expected_active_experts_by_simulation(8, 2, tokens, 3000, rng)
        assert nb.expected_active_experts_nb(8.0, 2.0, tokens) == pytest.approx(mc, rel=0.03)


def test_mixtral_batch1_reads_two_experts_batch256_all():
    cm = CostModel.create("mistralai/Mixtral-8x7B-v0.1", "H100-SXM")
    assert nb.expected_active_experts_nb(8.0, 2.0, 1) == pytest.approx(2.0)
    assert nb.expected_active_experts_nb(8.0, 2.0, 256) == pytest.approx(8.0)
    t1, t256 = cm.forward_time([10]).total_s, cm.forward_time([10] * 256).total_s
    assert t256 > 2.5 * t1  # reading 4x the expert weights dominates


def test_fp8_weights_decode_faster_than_bf16():
    bf16 = CostModel.create(LLAMA3, "H100-SXM", dtype="bf16").forward_time([100] * 8).total_s
    fp8 = CostModel.create(LLAMA3, "H100-SXM", dtype="fp8").forward_time([100] * 8).total_s
    assert 0.45 < fp8 / bf16 < 0.8


@pytest.mark.parametrize("bad", [[-1], [1.5], np.array([[1, 2]]), ["a"]])
def test_bad_token_counts_raise_value_error(bad):
    cm = CostModel.create(LLAMA3, "H100-SXM")
    with pytest.raises(ValueError):
        cm.forward_time(bad)
    with pytest.raises(ValueError):
        cm.forward_time([], bad, [0])


def test_mismatched_prefill_lengths():
    cm = CostModel.create(LLAMA3, "H100-SXM")
    with pytest.raises(ValueError, match="one context length per prefill chunk"):
        cm.forward_time([], [10, 20], [0])


def test_bad_create_arguments():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        CostModel.create(LLAMA3, "H100-SXM", tp=3)
    with pytest.raises(ValueError, match="dtype"):
        CostModel.create(LLAMA3, "H100-SXM", dtype="fp4")
    with pytest.raises(ValueError, match="closest"):
        CostModel.create(LLAMA3, "H100-SMX")


def test_default_profile_is_the_shipped_fit():
    prof = default_profile()
    assert "H100" in prof.fitted_on
    assert 0.6 < prof.compute_efficiency < 0.85 and 0.8 < prof.bandwidth_efficiency <= 1.0


@given(dec=st.lists(st.integers(0, 5000), max_size=40),
       pre=st.lists(st.tuples(st.integers(1, 500), st.integers(0, 3000)), max_size=3))
def test_tabled_stage_time_equals_closed_form(dec, pre):
    cm = CostModel.create(LLAMA3, "A100-SXM-80GB", tp=2)
    tok, seq = nb.build_tables_nb(cm.params, cm.ops, 2000, 50)
    agg = cm.batch_aggregates(np.array(dec, dtype=np.int64), np.array([n for n, _ in pre], dtype=np.int64),
                              np.array([c for _, c in pre], dtype=np.int64))
    body, head = nb.stage_time_nb(cm.params, tok, seq, 0, 0, agg)
    compute, comm = nb.forward_time_nb(cm.params, cm.ops, *agg)
    assert body + head == pytest.approx(compute + comm, rel=1e-12)
    n, s_ = agg.n_decodes + agg.prefill_tokens, agg.n_decodes + agg.n_prefills
    assert tok[1, n] + seq[1, s_] == pytest.approx(comm, rel=1e-12)  # the communication row
