"""The validation harness: published points replayed as their sources ran them, and the development
set's error kept from drifting up (bench/validate.py prints the tables)."""
import math

import numpy as np
import pytest

from fastsim.config import build_config
from fastsim.simulation import simulate
from fastsim.validation.published import Point, Row, figures, load_points, point_config, validate
from fastsim.validation.report import error_stats, markdown_tables

# The development set's error as last recorded (bench/validate.py, docs/validation.md; 9.0% and
# 25.6% before the serving terms): a change may lower these, and must then lower them here; raising
# them needs a reason in the commit.
RECORDED_MEDIAN = 0.051
RECORDED_P90 = 0.151  # 0.173 at 4 seeds (flattered by their noise), 0.177 at 64, 0.151 after the refit
MARGIN = 0.005


def test_every_published_point_loads_with_its_figures_and_a_valid_config():
    points = load_points()
    assert len(points) == 173
    assert sum(len(p.measured) for p in points) == 254
    kinds = {p.kind for p in points}
    assert kinds == {"static_batch_latency", "static_batch_prefill", "offline_dataset", "offline_fixed",
                     "online_poisson"}
    for p in points:
        assert p.measured and all(v > 0 for v in p.measured.values()), p.point_id
        cfg = build_config(point_config(p))
        assert cfg.engine.tensor_parallel_size == p.tp
    by_id = {p.point_id: p for p in points}
    # NVIDIA's offline table: trtllm-bench's request count for the ISL/OSL pair, all at once, FP8 on H100
    cfg = build_config(point_config(by_id["P0131"]))
    assert cfg.workload.num_requests == 30000 and cfg.engine.framework == "trtllm"
    assert cfg.engine.kv_cache_free_gpu_mem_fraction == 0.95
    # Argonne's mid-2024 vLLM: V0, whole prefills, a budget of max(max_model_len, 2048) (Llama-2-7B: 4096)
    eng = build_config(point_config(by_id["P0043"])).engine
    assert (eng.scheduler, eng.enable_chunked_prefill, eng.max_num_batched_tokens, eng.dtype) == ("v0", False, 4096, "fp16")
    # A Poisson point at its rate; an infinite rate is every request at once
    assert build_config(point_config(by_id["P0315"])).workload.clients[0].arrival.rate == 2.0
    assert build_config(point_config(by_id["P0320"])).workload.clients[0].arrival.process == "batch"


def test_figures_are_computed_as_the_benchmarks_compute_them():
    p = next(p for p in load_points() if p.point_id == "P0131")
    p = Point(**{**p.__dict__, "num_prompts": 50, "measured": {"output_tok_s": 1.0}})
    result = simulate(build_config(point_config(p)))
    t = result.requests
    finish = t.column("finish_s").to_numpy()
    # all 50 arrive at 0: output tokens over the time to the last finish
    assert figures(p, result)["output_tok_s"] == pytest.approx(50 * 128 / finish.max(), rel=1e-12)
    q = Point(**{**p.__dict__, "kind": "static_batch_latency", "batch": 50, "measured": {"batch_latency_ms": 1.0}})
    assert figures(q, result)["batch_latency_ms"] == pytest.approx(finish.max() * 1e3, rel=1e-12)


def test_error_statistics_by_hand():
    p = load_points()[0]
    rows = [Row(p, "m", 100.0, v) for v in (90.0, 105.0, 120.0, 100.0)]  # errors -10%, +5%, +20%, 0
    s = error_stats(rows)
    assert s["count"] == 4
    assert s["median"] == pytest.approx(0.075)  # |e| sorted: 0, .05, .10, .20
    assert s["bias"] == pytest.approx(0.025)
    assert s["over"] == pytest.approx(0.5)
    assert s["p90"] == pytest.approx(0.10 + 0.7 * 0.10)  # numpy's linear interpolation at 90%
    assert "| all | 4 |" in markdown_tables(rows)


@pytest.mark.slow
@pytest.mark.regression
def test_development_set_error_does_not_drift_up():
    rows = validate()
    s = error_stats(rows)
    assert s["count"] == 254
    assert all(math.isfinite(r.predicted) and r.predicted > 0 for r in rows)
    assert s["median"] <= RECORDED_MEDIAN + MARGIN, f"median |error| {s['median']:.3f}"
    assert s["p90"] <= RECORDED_P90 + MARGIN, f"p90 |error| {s['p90']:.3f}"
    assert np.isfinite(s["bias"])


def test_kv_cache_plan_matches_the_blocks_vllm_logged():
    from fastsim.validation.kv_capacity import kv_capacity_table, load_kv_points

    points = load_kv_points()
    # at least ten logged figures, each citing its log, over several GPUs and vLLM versions
    assert len(points) >= 10 and all(p.source for p in points)
    assert len({p.gpu for p in points}) >= 2 and len({p.vllm_version for p in points}) >= 3
    table = kv_capacity_table()
    errors = np.abs([r["error"] for r in table])
    assert np.median(errors) <= 0.01, kv_report(table)
    assert errors.max() <= 0.05, kv_report(table)


def kv_report(table):
    return "; ".join(f"{r['id']} {r['error']:+.3f}" for r in table)


def test_profiling_run_terms_by_hand():
    from fastsim.catalog import load_gpu, load_model
    from fastsim.config import Engine
    from fastsim.memory import activation_bytes, non_torch_bytes

    llama, h100, l40s = load_model("meta-llama/Llama-3.1-8B"), load_gpu("H100-SXM"), load_gpu("L40S")
    # V1: the sampler's 1024 x 128256 float32 logits (16 bytes each at the peak) exceed the MLP's
    # 8192 x (2 x 4096 + 3 x 14336) x 2 bytes
    v1 = Engine(max_num_seqs=1024)
    assert activation_bytes(llama, v1, 1) == max(1024 * 128256 * 16, 8192 * (2 * 4096 + 3 * 14336) * 2)
    assert activation_bytes(llama, v1, 1) == 1024 * 128256 * 16
    # V0 sampled inside the step: the MLP's peak plus 8 bytes per logit of max_num_seqs rows;
    # under TP the MLP's intermediate is split
    v0 = Engine(scheduler="v0", enable_chunked_prefill=False, max_num_batched_tokens=20000)
    assert activation_bytes(llama, v0, 2) == 20000 * (2 * 4096 + 3 * 14336 / 2) * 2 + 256 * 128256 * 8
    # NVLink's NCCL buffers under TP only; PCIe logs none
    gib = 2**30
    assert non_torch_bytes(h100, v1, 1) == 0.25 * gib and non_torch_bytes(h100, v1, 2) == 2.1 * gib
    assert non_torch_bytes(l40s, v1, 4) == 0.25 * gib
