"""Framework profiles: TensorRT-LLM's defaults, its KV-cache sizing by hand, and option checks."""
import pytest

from fastsim.catalog import load_gpu, load_model
from fastsim.config import Engine, load_config
from fastsim.errors import FastsimError
from fastsim.memory import memory_plan, non_torch_bytes
from fastsim.planning import plan_engines
from fastsim.simulation import simulate


def cfg(**engine):
    return load_config(None, ["model=meta-llama/Llama-3.1-8B", "workload.num_requests=50"]
                       + [f"engine.{k}={v}" for k, v in engine.items()])


def test_trtllm_defaults_and_fp8_only_where_the_gpu_has_it():
    e = Engine(framework="trtllm")
    assert (e.max_num_seqs, e.max_num_batched_tokens, e.block_size) == (2048, 8192, 32)
    assert e.capacity_scheduler_policy == "guaranteed_no_evict" and e.kv_cache_free_gpu_mem_fraction == 0.9
    _, _, plans = plan_engines(cfg(framework="trtllm"))
    h100 = plans[0][1][0].engine
    assert (h100.dtype, h100.kv_cache_dtype) == ("fp8", "fp8")
    c = cfg(framework="trtllm").model_copy(update={"hardware": cfg().hardware.model_copy(update={"gpu": "A100-SXM-80GB"})})
    a100 = plan_engines(c)[2][0][1][0].engine
    assert a100.dtype == "bf16"  # Ampere has no FP8
    explicit = plan_engines(cfg(framework="trtllm", dtype="bf16"))[2][0][1][0].engine
    assert (explicit.dtype, explicit.kv_cache_dtype) == ("bf16", "fp8")


def test_trtllm_kv_cache_is_a_fraction_of_what_the_model_leaves():
    model, gpu = load_model("meta-llama/Llama-3.1-8B"), load_gpu("H100-SXM")
    trt_engine = Engine(framework="trtllm", dtype="fp8", kv_cache_dtype="fp8", kv_cache_free_gpu_mem_fraction=0.5)
    trt = memory_plan(model, gpu, trt_engine)
    left = gpu.cuda_memory_bytes - trt.weight_bytes - trt.activation_bytes - non_torch_bytes(gpu, trt_engine, 1)
    # 64 KiB per token in FP8 (32 layers x 8 KV heads x 128 x 2 (K, V) x 1 byte), 32-token blocks
    assert trt.kv_bytes_per_token == 32 * 8 * 128 * 2
    assert trt.num_gpu_blocks == int(0.5 * left // (32 * trt.kv_bytes_per_token))


def test_trtllm_options_belong_to_trtllm():
    for bad in ({"capacity_scheduler_policy": "max_utilization"}, {"kv_cache_free_gpu_mem_fraction": 0.8}):
        with pytest.raises(FastsimError, match="TensorRT-LLM"):
            cfg(**bad)
    with pytest.raises(FastsimError, match="trtllm"):
        cfg(framework="trtllm", enable_prefix_caching="true")


def test_guaranteed_no_evict_never_preempts_where_max_utilization_does():
    """A small cache under load: max_utilization pauses requests (preemptions), the default never."""
    over = ["model=meta-llama/Llama-3.1-8B", "workload.num_requests=300", "engine.framework=trtllm",
            "engine.num_gpu_blocks_override=400", "engine.max_model_len=4096",
            "workload.clients.0.arrival.rate=20"]
    no_evict = simulate(load_config(None, over)).summary
    max_util = simulate(load_config(None, over + ["engine.capacity_scheduler_policy=max_utilization"])).summary
    assert no_evict["preemptions"] == 0 and max_util["preemptions"] > 0
    for s in (no_evict, max_util):  # every request served but those too long for the cache
        assert s["completed"] + s["rejected"] == 300 and s["unfinished"] == 0


def test_token_budget_below_max_num_seqs_is_vllms_refusal_only():
    """vLLM's SchedulerConfig refuses max_num_batched_tokens < max_num_seqs at startup; SGLang's
    --chunked-prefill-size and TensorRT-LLM's max_num_tokens carry no such rule."""
    for framework in ("vllm", "dynamo"):
        with pytest.raises(FastsimError, match=r"max_num_batched_tokens \(128\) is smaller than max_num_seqs \(256\)"):
            cfg(framework=framework, max_num_batched_tokens=128)
    cfg(framework="vllm", max_num_batched_tokens=256)  # equal is allowed
    for framework in ("sglang", "trtllm"):
        cfg(framework=framework, max_num_batched_tokens=128, max_num_seqs=256)


def test_every_framework_is_one_registry_entry_the_config_and_planning_read():
    """A framework's defaults are engine arguments its own rules accept, its serving terms exist,
    and the config offers exactly the registered names; routers likewise have one list of names."""
    from fastsim.config import Cluster, Engine
    from fastsim.cost.serving import PROFILES
    from fastsim.engine import enums as E
    from fastsim.frameworks import FRAMEWORK_NAMES, FRAMEWORKS
    from fastsim.policies import ROUTERS

    assert Engine.model_fields["framework"].annotation.__args__ == FRAMEWORK_NAMES
    for name, fw in FRAMEWORKS.items():
        assert set(fw.defaults) <= set(Engine.model_fields), name
        eng = Engine(framework=name)
        assert all(getattr(eng, k) == v for k, v in fw.defaults.items()), name
        assert fw.serving in PROFILES, name
    assert Cluster.model_fields["router"].annotation.__args__ == ROUTERS == tuple(E.ROUTE_NAMES)
    # A rule read from the profile, not the name: TensorRT-LLM's queue has no longest-prefix order.
    with pytest.raises(ValueError, match="schedule_policy: lpm is SGLang's"):
        Engine(framework="trtllm", schedule_policy="lpm")
