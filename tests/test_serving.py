"""What a serving framework adds around the forward pass (fastsim/cost/serving.py), and which cost
profile each GPU gets (fastsim/cost/profile.py): checked by hand on one request."""
import numpy as np
import pytest

from fastsim.catalog import load_gpu, load_model
from fastsim.config import Engine, build_config, load_config
from fastsim.cost import CostModel
from fastsim.cost.profile import (BANDWIDTH_FIELDS, OTHER_LINK, PRE_HOPPER_ATTENTION, default_profile, gpu_profile,
                                  profile_origin, profile_warning)
from fastsim.cost.serving import PROFILES, engine_serving, serving_profile
from fastsim.planning import plan_engines
from fastsim.simulation import simulate


def one_request(prompt, output, *extra, process="batch", online=None):
    arrival = "{process: batch}" if process == "batch" else "{process: poisson, rate: 0.001}"
    flag = "" if online is None else f"online: {str(online).lower()}, "
    return load_config(None, [f"workload.clients=[{{{flag}arrival: {arrival}, prompt_tokens: {{dist: constant, "
                              f"value: {prompt}}}, output_tokens: {{dist: constant, value: {output}}}}}]",
                              "workload.num_requests=1", *extra])


def by_hand(framework, prompt, output, gpu="H100-SXM", model="meta-llama/Meta-Llama-3-8B", **engine):
    """(TTFT, end-to-end) in seconds of one request alone: each iteration is the framework's CPU time
    (fixed + per sequence + per token) and then the forward pass with the framework's kernels."""
    s = engine_serving(Engine(framework=framework, **engine))
    cm = CostModel.create(model, gpu, dtype=engine.get("dtype", "bf16"), profile=s.kernels(gpu_profile(load_gpu(gpu))))

    def cpu(tokens):
        return s.overhead_ms * 1e-3 + (s.per_seq_us + tokens * s.per_token_us) * 1e-6

    none = np.zeros(0, np.int64)
    ttft = cpu(prompt) + cm.forward_time(none, np.array([prompt]), np.array([0])).total_s
    steps = sum(cpu(1) + cm.forward_time(np.array([prompt + j])).total_s for j in range(output - 1))
    return ttft, ttft + steps


@pytest.mark.parametrize("framework", ["vllm", "trtllm", "sglang"])
def test_one_request_costs_its_frameworks_cpu_time_and_kernels(framework):
    extra = [f"engine.framework={framework}"] + (["engine.dtype=bf16", "engine.kv_cache_dtype=bf16"]
                                                 if framework == "trtllm" else [])
    r = simulate(one_request(700, 6, *extra)).requests.to_pylist()[0]
    ttft, e2e = by_hand(framework, 700, 6, dtype="bf16")
    assert r["ttft_ms"] == pytest.approx(ttft * 1e3, rel=1e-9)
    assert r["e2el_ms"] == pytest.approx(e2e * 1e3, rel=1e-9)


def test_engine_arguments_override_the_frameworks_serving_terms():
    s = engine_serving(Engine(framework_overhead_ms=2.0, framework_overhead_per_seq_us=10.0,
                              framework_overhead_per_token_us=0.5, api_server_latency_ms=7.0))
    assert (s.overhead_ms, s.per_seq_us, s.per_token_us, s.api_server_latency_ms) == (2.0, 10.0, 0.5, 7.0)
    # the rest stays the framework's
    assert s.elementwise_passes == PROFILES["vllm"].elementwise_passes
    r = simulate(one_request(300, 4, "engine.framework_overhead_ms=2.0", "engine.framework_overhead_per_seq_us=10",
                             "engine.framework_overhead_per_token_us=0.5")).requests.to_pylist()[0]
    ttft, e2e = by_hand("vllm", 300, 4, framework_overhead_ms=2.0, framework_overhead_per_seq_us=10.0,
                        framework_overhead_per_token_us=0.5)
    assert r["ttft_ms"] == pytest.approx(ttft * 1e3, rel=1e-9) and r["e2el_ms"] == pytest.approx(e2e * 1e3, rel=1e-9)


def test_vllms_v0_scheduler_has_its_own_profile():
    assert serving_profile("vllm", "v0") is PROFILES["vllm-v0"]
    assert serving_profile("vllm", "v1") is PROFILES["vllm"] and serving_profile("dynamo") is PROFILES["vllm"]


def test_the_api_server_delays_online_requests_only():
    api = PROFILES["vllm"].api_server_latency_ms
    assert api > 0
    offline = simulate(one_request(500, 5)).requests.to_pylist()[0]
    online = simulate(one_request(500, 5, process="poisson")).requests.to_pylist()[0]
    # one request alone: the same engine time, seen api_server_latency_ms later through the server
    assert online["ttft_ms"] == pytest.approx(offline["ttft_ms"] + api, rel=1e-9)
    assert online["e2el_ms"] == pytest.approx(offline["e2el_ms"] + api, rel=1e-9)
    assert online["tpot_ms"] == pytest.approx(offline["tpot_ms"], rel=1e-9)
    # a client says which it is: an online burst (`vllm bench serve` at an infinite rate)
    burst = simulate(one_request(500, 5, online=True)).requests.to_pylist()[0]
    assert burst["ttft_ms"] == pytest.approx(offline["ttft_ms"] + api, rel=1e-9)
    off = simulate(one_request(500, 5, online=False, process="poisson")).requests.to_pylist()[0]
    assert off["ttft_ms"] == pytest.approx(offline["ttft_ms"], rel=1e-9)
    zero = simulate(one_request(500, 5, "engine.api_server_latency_ms=0", process="poisson")).requests.to_pylist()[0]
    assert zero["ttft_ms"] == pytest.approx(offline["ttft_ms"], rel=1e-9)


def test_sliding_windows_as_each_engine_serves_them():
    mistral = ["model=mistralai/Mistral-7B-v0.1"]
    window = load_model("mistralai/Mistral-7B-v0.1").sliding_window
    assert window == 4096
    # vLLM attends within the window; TensorRT-LLM over the whole cache unless asked
    assert PROFILES["vllm"].uses_sliding_window and not PROFILES["trtllm"].uses_sliding_window
    long = one_request(12000, 400, *mistral)
    windowed = simulate(long).summary["mean_tpot_ms"]
    whole = simulate(one_request(12000, 400, *mistral, "engine.disable_sliding_window=false",
                                 "engine.framework=trtllm")).summary["mean_tpot_ms"]
    assert whole > 0 and windowed > 0
    trt_whole = simulate(one_request(12000, 400, *mistral, "engine.framework=trtllm")).summary["mean_tpot_ms"]
    assert trt_whole > whole  # decodes read 12,000+ cached tokens instead of 4,096
    # vLLM's --disable-sliding-window caps the context at the window, as vLLM does
    _, _, plans = plan_engines(one_request(1000, 10, *mistral, "engine.disable_sliding_window=true"))
    assert plans[0][1][0].memory.max_model_len == window
    _, _, plans = plan_engines(one_request(1000, 10, *mistral))
    assert plans[0][1][0].memory.max_model_len == 32768


def test_each_gpu_gets_its_own_fit_or_the_datasheet_transfer():
    h100, h200, b200, a100, l40s = (load_gpu(g) for g in ("H100-SXM", "H200-SXM", "B200", "A100-SXM-80GB", "L40S"))
    assert gpu_profile(h100) == default_profile() and profile_origin(h100) == "measured"
    assert gpu_profile(h200).fitted_on.startswith("NVIDIA H200") and profile_origin(h200) == "measured"
    # HBM3e: H200's achieved bandwidth fractions, the rest from the H100 fit
    for f in BANDWIDTH_FIELDS:
        assert getattr(gpu_profile(b200), f) == getattr(gpu_profile(h200), f)
    assert gpu_profile(b200).compute_efficiency == default_profile().compute_efficiency
    # before Hopper, FlashAttention-2 reaches a larger share of the peak (its papers' figures)
    assert gpu_profile(a100) == default_profile().model_copy(
        update={"attention_efficiency": default_profile().attention_efficiency * PRE_HOPPER_ATTENTION})
    # the all-reduce terms were fitted over NVLink: a PCIe GPU keeps the priors
    for f, v in OTHER_LINK.items():
        assert getattr(gpu_profile(l40s), f) == v
    # H200 decodes attention at about H100's rate, not 1.43x (its measured rows): the H200 fit says so
    cm = {g.name: CostModel.create("meta-llama/Meta-Llama-3-8B", g) for g in (h100, h200)}
    ratio = cm["H100-SXM"].attention_time(np.full(128, 4096)) / cm["H200-SXM"].attention_time(np.full(128, 4096))
    assert 0.95 < ratio < 1.15


def test_an_amd_gpu_without_measurements_is_flagged():
    assert profile_warning(load_gpu("MI300X")) is not None and profile_origin(load_gpu("MI300X")) == "uncalibrated"
    assert profile_warning(load_gpu("H100-SXM")) is None and profile_warning(load_gpu("L40S")) is None


@pytest.mark.slow
def test_overlapped_gaps_are_each_iterations_longer_time():
    """closed_form_nb.gaps_nb (fast mode's closed-form runs) against max(cpu, gpu) and cpu + gpu iteration by
    iteration, the GPU's time growing with the context as a quadratic."""
    from fastsim.engine import cost_nb as nb
    from fastsim.engine.closed_form_nb import gaps_nb

    rng = np.random.default_rng(0)
    for case in range(400):
        gpu0, a1, a2 = rng.uniform(1e-3, 8e-3), rng.choice([0.0, rng.uniform(0, 2e-5)]), rng.choice([0.0, rng.uniform(0, 1e-8)])
        cpu, kmax, overlap = rng.uniform(0, 1.5e-2), int(rng.integers(1, 2000)), case % 4 != 0
        p = np.zeros(nb.N_PARAMS)
        p[nb.CPU_OVERLAP] = overlap
        u0 = 0  # runs start over where the last one ended, as run_nb does
        while u0 < kmax:
            g = lambda u: gpu0 + a1 * (u0 + u) + a2 * (u0 + u) ** 2
            b = g(0)
            k, b0, t1, t2 = gaps_nb(p, cpu, b, a1 + 2 * a2 * u0, a2, kmax - u0)
            assert 1 <= k <= kmax - u0
            for u in range(k):
                want = max(cpu, g(u)) if overlap else cpu + g(u)
                assert b0 + t1 * u + t2 * u * u == pytest.approx(want, rel=1e-9)
            u0 += k


def test_async_scheduling_overlaps_cpu_and_gpu_by_hand():
    """One request decoding alone: with the CPU's 20 ms per iteration over the GPU's few, an
    iteration takes the CPU's 20 ms overlapped, their sum in series; with 1 ms of CPU, the GPU's."""
    def tpot(overhead_ms, overlap):
        cfg = build_config({"engine": {"framework_overhead_ms": overhead_ms, "framework_overhead_per_seq_us": 0,
                                       "framework_overhead_per_token_us": 0, "async_scheduling": overlap},
                            "workload": {"num_requests": 1, "clients": [{"online": False, "arrival": {"process": "batch"},
                                         "prompt_tokens": {"dist": "constant", "value": 100},
                                         "output_tokens": {"dist": "constant", "value": 50}}]}})
        return simulate(cfg).requests.column("tpot_ms").to_numpy()[0]

    gpu = tpot(0.0, False)
    assert 3 < gpu < 15  # Llama-3-8B's decode step on an H100, ms
    assert tpot(20.0, True) == pytest.approx(20.0, rel=1e-9)
    assert tpot(20.0, False) == pytest.approx(20.0 + gpu, rel=1e-9)
    assert tpot(1.0, True) == pytest.approx(gpu, rel=1e-9)
    assert tpot(1.0, False) == pytest.approx(1.0 + gpu, rel=1e-9)
    with pytest.raises(ValueError, match="async_scheduling is modelled"):
        build_config({"engine": {"async_scheduling": True, "pipeline_parallel_size": 2}})


def test_multi_step_pays_the_cpu_once_per_steps_by_hand():
    """vLLM V0's num_scheduler_steps 4: one request's 100 decode steps run as 25 batches of 4, the
    CPU's 4 ms paid before the first step of each: TPOT falls by 3/4 of it, to the GPU's plus 1 ms."""
    def tpot(steps, overhead_ms):
        cfg = build_config({"engine": {"scheduler": "v0", "enable_chunked_prefill": False, "num_scheduler_steps": steps,
                                       "framework_overhead_ms": overhead_ms, "framework_overhead_per_seq_us": 0,
                                       "framework_overhead_per_token_us": 0},
                            "workload": {"num_requests": 1, "clients": [{"online": False, "arrival": {"process": "batch"},
                                         "prompt_tokens": {"dist": "constant", "value": 100},
                                         "output_tokens": {"dist": "constant", "value": 101}}]}})
        return simulate(cfg).requests.column("tpot_ms").to_numpy()[0]

    gpu = tpot(1, 0.0)
    assert tpot(1, 4.0) == pytest.approx(gpu + 4.0, rel=1e-9)
    assert tpot(4, 4.0) == pytest.approx(gpu + 1.0, rel=1e-9)
    with pytest.raises(ValueError, match="num_scheduler_steps = 4 is vLLM V0's"):
        build_config({"engine": {"num_scheduler_steps": 4}})
