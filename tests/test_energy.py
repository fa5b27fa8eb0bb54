"""Power, energy and cost in the summary, by hand from the replicas' busy time and the catalog."""
import pytest

from fastsim.catalog import load_gpu
from fastsim.catalog.gpus import IDLE_FRACTION_OF_TDP
from fastsim.config import load_config
from fastsim.simulation import simulate


def run(*extra):
    return simulate(load_config(None, ["workload.num_requests=200", *extra])).summary


def test_power_energy_and_cost_by_hand():
    s = run()
    gpu = load_gpu("H100-SXM")
    r = s["replicas"][0]
    busy = r["compute_time_s"] + r["comm_time_s"]
    util = busy / s["simulated_time_s"]
    idle = IDLE_FRACTION_OF_TDP * 700
    power = idle + (700 - idle) * util
    assert r["gpu_utilization"] == pytest.approx(util, rel=1e-12) and 0 < util < 1
    assert s["mean_power_w"] == pytest.approx(power, rel=1e-12)
    energy = power * s["simulated_time_s"]
    assert s["energy_j"] == pytest.approx(energy, rel=1e-12)
    assert s["energy_per_request_j"] == pytest.approx(energy / 200, rel=1e-12)
    tokens = s["total_output_tokens"]  # every request measured: no warm-up or cool-down
    assert s["energy_per_1k_output_tokens_j"] == pytest.approx(1000 * energy / tokens, rel=1e-12)
    usd = gpu.price_usd_per_hour * s["simulated_time_s"] / 3600
    assert s["usd_per_1m_output_tokens"] == pytest.approx(1e6 * usd / tokens, rel=1e-12)


def test_tensor_parallel_gpus_all_draw_power_and_price_overrides():
    one = run()
    two = run("engine.tensor_parallel_size=2", "hardware.prices_usd_per_hour={H100-SXM: 1.0}")
    r = two["replicas"][0]
    assert two["energy_j"] == pytest.approx(2 * r["power_w"] * two["simulated_time_s"], rel=1e-12)
    assert two["usd_per_1m_output_tokens"] == pytest.approx(
        1e6 * 2 * 1.0 * two["simulated_time_s"] / 3600 / two["total_output_tokens"], rel=1e-12)
    # Idle GPUs still draw power: more GPUs for the same light load cost more energy per token.
    assert two["energy_per_1k_output_tokens_j"] > one["energy_per_1k_output_tokens_j"]


def test_gpu_without_tdp_or_price_gives_none(tmp_path):
    gpus = tmp_path / "gpus.yaml"
    gpus.write_text("MyGPU: {memory_gib: 80, mem_bw_gb_s: 3000, bf16_tflops: 900, link_gb_s: 400}\n")
    s = run(f"hardware.gpus_file={gpus}", "hardware.gpu=MyGPU")
    assert s["energy_j"] is None and s["usd_per_1m_output_tokens"] is None and s["gpu_utilization"] > 0
    idle = tmp_path / "idle.yaml"
    idle.write_text("MyGPU: {memory_gib: 80, mem_bw_gb_s: 3000, bf16_tflops: 900, link_gb_s: 400, tdp_w: 500, "
                    "idle_w: 50}\n")
    s = run(f"hardware.gpus_file={idle}", "hardware.gpu=MyGPU")
    assert s["mean_power_w"] == pytest.approx(50 + 450 * s["gpu_utilization"], rel=1e-12)
