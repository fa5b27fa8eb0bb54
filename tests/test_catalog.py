import json

import pytest
import yaml

from fastsim.catalog import gpu_ids, load_gpu, load_model, model_ids
from fastsim.catalog.gpus import load_gpu_file
from fastsim.errors import FastsimError

REQUIRED_MODELS = [
    "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
    "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-70B", "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-405B", "mistralai/Mistral-7B-v0.1",
    "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-14B",
    "Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-72B",
]
REQUIRED_GPUS = ["A100-SXM-40GB", "A100-SXM-80GB", "H100-SXM", "H100-PCIe", "H200-SXM", "B200",
                 "L40S", "L4", "A10G", "MI300X"]


def test_required_models_present():
    assert set(REQUIRED_MODELS) <= set(model_ids())


@pytest.mark.parametrize("mid,billions", [
    ("meta-llama/Meta-Llama-3-8B", 8.03), ("meta-llama/Meta-Llama-3-70B", 70.6),
    ("mistralai/Mixtral-8x7B-v0.1", 46.7), ("meta-llama/Llama-2-7b-hf", 6.74),
    ("meta-llama/Llama-3.1-405B", 405.9), ("Qwen/Qwen2.5-7B", 7.62), ("Qwen/Qwen2.5-1.5B", 1.54),
])
def test_published_parameter_counts(mid, billions):
    assert load_model(mid).num_params / 1e9 == pytest.approx(billions, abs=0.01 * billions)


def test_kv_bytes_per_token_by_hand():
    # 2 (K and V) x 8 KV heads x 128 head_dim x 2 bytes x 32 layers = 131072 B = 128 KiB (GQA).
    assert load_model("meta-llama/Meta-Llama-3-8B").kv_bytes_per_token("bf16") == 128 * 1024
    # Llama-2-7B is multi-head: 32 KV heads -> 4x as much.
    assert load_model("meta-llama/Llama-2-7b-hf").kv_bytes_per_token("bf16") == 512 * 1024
    assert load_model("meta-llama/Meta-Llama-3-8B").kv_bytes_per_token("fp8") == 64 * 1024


def test_weight_bytes_by_dtype():
    m = load_model("meta-llama/Meta-Llama-3-8B")
    assert m.weight_bytes("bf16") == 2 * m.num_params
    # Quantized checkpoints keep the 128256 x 4096 embedding and (untied) LM head in 16 bits.
    ends = 2 * 128256 * 4096
    assert m.weight_bytes("fp8") == (m.num_params - ends) + 2 * ends
    assert m.weight_bytes("int4") == (m.num_params - ends) / 2 + 2 * ends
    assert m.weight_bytes("int4") / 1e9 == pytest.approx(6.98 / 2 + 2.10, abs=0.01)  # GB: body in 4 bits, ends in 16


def test_flops_per_token_llama3_8b_by_hand():
    m = load_model("meta-llama/Meta-Llama-3-8B")
    per_layer = 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336
    matmul = 32 * per_layer + 128256 * 4096  # untied LM head, no embedding lookup
    assert m.flops_per_token(0) == 2 * matmul + 4 * 4096 * 1 * 32
    assert m.flops_per_token(999) - m.flops_per_token(0) == 4 * 4096 * 999 * 32


def test_moe_active_params():
    m = load_model("mistralai/Mixtral-8x7B-v0.1")
    assert m.is_moe and m.num_local_experts == 8 and m.num_experts_per_tok == 2
    # ~12.9 B active parameters per token (2 of 8 experts), as Mistral publishes.
    assert m.num_active_params / 1e9 == pytest.approx(12.9, abs=0.1)


def test_unknown_model_lists_closest():
    with pytest.raises(FastsimError, match="Meta-Llama-3-8B") as e:
        load_model("meta-llama/Meta-Llama-3-8b")
    assert "fastsim models" in str(e.value)


def test_local_config_json(tmp_path):
    cfg = {"hidden_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 16,
           "num_key_value_heads": 1, "intermediate_size": 5632, "vocab_size": 32000,
           "max_position_embeddings": 2048}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for ref in (tmp_path, tmp_path / "config.json"):
        m = load_model(str(ref))
        assert m.head_dim == 128 and m.num_key_value_heads == 1
        assert m.kv_bytes_per_token() == 2 * 1 * 128 * 2 * 4  # MQA


def test_config_missing_field_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2,
                                                      "vocab_size": 10, "max_position_embeddings": 8}))
    with pytest.raises(FastsimError, match="num_attention_heads"):
        load_model(str(tmp_path))


def test_config_bad_value_is_named(tmp_path):
    cfg = {"hidden_size": -4, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 8,
           "vocab_size": 10, "max_position_embeddings": 8, "head_dim": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FastsimError, match="hidden_size"):
        load_model(str(tmp_path))


def test_required_gpus_present_with_datasheet_figures():
    assert set(REQUIRED_GPUS) <= set(gpu_ids())
    h100 = load_gpu("H100-SXM")
    assert (h100.mem_bw_gb_s, h100.bf16_tflops, h100.fp8_tflops, h100.memory_gib) == (3350, 989.4, 1978.9, 80)
    assert load_gpu("A100-SXM-80GB").fp8_tflops is None
    for g in REQUIRED_GPUS:
        assert load_gpu(g).source.startswith("http")


def test_compute_rate_by_dtype():
    assert load_gpu("H100-SXM").compute_tflops("fp8") == 1978.9
    assert load_gpu("A100-SXM-80GB").compute_tflops("fp8") == 312  # weight-only on Ampere
    assert load_gpu("H100-SXM").compute_tflops("int4") == 989.4


def test_unknown_gpu_lists_closest():
    with pytest.raises(FastsimError, match="H100-SXM"):
        load_gpu("H100")


def test_user_gpu_yaml(tmp_path):
    f = tmp_path / "gpus.yaml"
    f.write_text(yaml.safe_dump({"MyGPU": {"memory_gib": 32, "mem_bw_gb_s": 1000, "bf16_tflops": 100,
                                           "link_gb_s": 25}}))
    custom = load_gpu_file(f)
    assert load_gpu("MyGPU", custom).mem_bw_gb_s == 1000
    f.write_text(yaml.safe_dump({"Bad": {"memory_gib": 32, "mem_bw_gbps": 1000, "bf16_tflops": 1,
                                         "link_gb_s": 1}}))
    with pytest.raises(FastsimError, match="mem_bw_gbps"):
        load_gpu_file(f)


def test_quantization_names_and_kv_capacity():
    from fastsim.catalog import load_gpu
    from fastsim.config import Engine
    from fastsim.memory import memory_plan

    m, h100 = load_model("meta-llama/Meta-Llama-3-8B"), load_gpu("H100-SXM")
    assert Engine(quantization="awq").dtype == "int4" and Engine(quantization="fp8").dtype == "fp8"
    with pytest.raises(ValueError, match="drop quantization or dtype"):
        Engine(quantization="awq", dtype="fp8")
    bf16 = memory_plan(m, h100, Engine())
    fp8 = memory_plan(m, h100, Engine(quantization="fp8"))
    # vLLM's kv_cache_dtype auto stays 16-bit under FP8 weights; the freed weight memory holds more KV.
    assert fp8.kv_bytes_per_token == bf16.kv_bytes_per_token == 128 * 1024
    freed = m.weight_bytes("bf16") - m.weight_bytes("fp8")
    assert fp8.num_gpu_blocks == int((bf16.kv_cache_bytes + freed + (bf16.budget_bytes - bf16.weight_bytes
                                       - bf16.activation_bytes - bf16.non_torch_bytes - bf16.kv_cache_bytes))
                                      // bf16.block_bytes)
    # An FP8 KV cache holds twice the tokens in the same bytes.
    kv8 = memory_plan(m, h100, Engine(kv_cache_dtype="fp8"))
    assert kv8.kv_bytes_per_token == 64 * 1024 and kv8.block_bytes == bf16.block_bytes / 2
    assert kv8.num_gpu_blocks in (2 * bf16.num_gpu_blocks, 2 * bf16.num_gpu_blocks + 1)


def test_fp8_gemms_run_at_fp8_rate_only_on_hopper():
    from fastsim.cost import CostModel
    from fastsim.cost.profile import default_profile

    # A compute-bound 8192-token prefill GEMM: FP8 doubles the peak on H100 (and its GEMMs reach their
    # own share of it), not on A100 (weight-only).
    h100 = default_profile()
    for gpu, ratio in (("H100-SXM", h100.compute_efficiency / (2 * h100.fp8_compute_efficiency)),
                       ("A100-SXM-80GB", 1.0)):
        fp8 = CostModel.create("meta-llama/Meta-Llama-3-8B", gpu, dtype="fp8")
        bf16 = CostModel.create("meta-llama/Meta-Llama-3-8B", gpu)
        assert fp8.gemm_time(8192, 4096, 14336) / bf16.gemm_time(8192, 4096, 14336) == pytest.approx(ratio, rel=0.02)
        # A whole prefill gains less: attention, norms and the LM head stay 16-bit.
        t8, t16 = fp8.forward_time([], [8192], [0]).total_s, bf16.forward_time([], [8192], [0]).total_s
        assert 0.5 < t8 / t16 <= 1.0
