"""fastsim search: memory pruning, the fewest replicas per deployment against a scan, the Pareto
frontier by hand, and the command's cheapest answer."""
import json

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from fastsim.capacity import judge, parse_slo
from fastsim.cli import app
from fastsim.config import build_config
from fastsim.errors import FastsimError
from fastsim.search import (Candidate, SearchSpace, at_rate, deployment_raw, fewest_replicas, pareto, run_search,
                            why_not_fit)
from fastsim.simulation import simulate

RAW = {"model": "meta-llama/Meta-Llama-3-8B", "hardware": {"gpu": "H100-SXM"},
       "workload": {"num_requests": 300, "clients": [
           {"arrival": {"process": "poisson", "rate": 1.0}, "prompt_tokens": {"dist": "constant", "value": 1000},
            "output_tokens": {"dist": "constant", "value": 100}}]}}
SLOS = [parse_slo("ttft_ms:p99=300"), parse_slo("tpot_ms:p99=40")]


def test_memory_pruning_before_simulation():
    raw = at_rate({**RAW, "model": "meta-llama/Meta-Llama-3-70B"}, 5.0)
    assert "tensor_parallel_size >= 2 fits" in why_not_fit(raw, Candidate("H100-SXM", 1, 1, 256, 8192))
    assert why_not_fit(raw, Candidate("H100-SXM", 4, 1, 256, 8192)) is None
    priced = {**raw, "hardware": {"gpu": "H100-SXM", "gpus_file": None}}
    assert why_not_fit(priced, Candidate("H100-SXM", 2, 1, 256, 8192)) is None
    with pytest.raises(FastsimError, match="one engine"):
        at_rate({**RAW, "engines": [{"name": "a"}]}, 5.0)
    with pytest.raises(FastsimError, match="disaggregation"):
        at_rate({**RAW, "cluster": {"disaggregation": {"prefill": {}, "decode": {}}}}, 5.0)


def test_fewest_replicas_is_the_first_count_that_meets_the_slos():
    raw = at_rate(RAW, 30.0)
    c = Candidate("L40S", 1, 1, 256, 8192)
    probes = fewest_replicas(raw, c, SLOS, max_replicas=8)
    best = min(p["data_parallel_size"] for p in probes if p["meets"])
    # a direct scan of the replica count
    meets = [judge(simulate(build_config(deployment_raw(raw, c, dp))).summary, SLOS) == "" for dp in range(1, 9)]
    assert meets.index(True) + 1 == best and not any(meets[:best - 1])
    row = next(p for p in probes if p["data_parallel_size"] == best)
    assert row["num_gpus"] == best and row["cost_usd_per_hour"] == pytest.approx(best * 0.87)


def test_pareto_by_hand():
    rows = [{"cost_usd_per_hour": c, "lat": l, "meets": m} for c, l, m in
            [(1, 50, True), (2, 40, True), (2, 30, True), (3, 35, True), (4, 10, False), (5, 20, True)]]
    assert [(r["cost_usd_per_hour"], r["lat"]) for r in pareto(rows, "lat")] == [(1, 50), (2, 30), (5, 20)]


def test_cli_search_finds_the_cheapest(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(RAW))
    res = CliRunner().invoke(app, ["search", str(cfg), "--rate", "20", "--slo", "ttft_ms:p99=300", "--slo",
                                   "tpot_ms:p99=40", "--gpu", "H100-SXM", "--gpu", "L40S", "--gpu", "A10G",
                                   "--tp", "1,2", "--max-replicas", "8", "-j", "1", "-o", str(tmp_path),
                                   "--set", "engine.gpu_memory_utilization=0.5"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    table = pq.read_table(tmp_path / "search.parquet").to_pylist()
    summary = json.loads((tmp_path / "search.json").read_text())
    ok = [r for r in table if r["meets"]]
    cheapest = min(ok, key=lambda r: r["cost_usd_per_hour"])
    assert summary["cheapest"]["cost_usd_per_hour"] == cheapest["cost_usd_per_hour"]
    assert all(r["meets"] == (judge(r, SLOS) == "") for r in table)
    # half of an A10G's 24 GB cannot hold 16 GB of weights; at TP 2 it can
    pruned = [p["candidate"] for p in summary["pruned"]]
    assert any("gpu='A10G', tensor_parallel_size=1" in p for p in pruned)
    assert not any("gpu='A10G', tensor_parallel_size=2" in p for p in pruned)
    assert [r["pareto"] for r in table].count(True) == len(summary["pareto"]) >= 1


def test_pareto_plot(tmp_path):
    from test_plots import check_image

    from fastsim.plots import plot_results

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(RAW))
    res = CliRunner().invoke(app, ["search", str(cfg), "--rate", "10", "--slo", "ttft_ms:p99=300", "--gpu", "L40S",
                                   "--gpu", "H100-SXM", "--tp", "1", "--max-replicas", "4", "-j", "1", "-o",
                                   str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    written = plot_results(tmp_path / "s")
    assert [p.name for p in written] == ["pareto.png", "pareto.svg"]
    check_image(written[0])


def test_search_by_energy_objective(tmp_path):
    """--objective energy_per_1k_output_tokens_j: the frontier starts at the lowest energy per token
    among the deployments meeting the SLOs."""
    out = run_search(RAW, 20.0, SLOS, SearchSpace(gpus=["H100-SXM", "L40S"], tensor_parallel_size=[1, 2],
                                                  max_replicas=8), tmp_path, objective="energy_per_1k_output_tokens_j")
    ok = [r for r in out.rows if r["meets"]]
    assert out.frontier[0]["energy_per_1k_output_tokens_j"] == min(r["energy_per_1k_output_tokens_j"] for r in ok)
    summary = json.loads((tmp_path / "search.json").read_text())
    assert summary["objective"] == "energy_per_1k_output_tokens_j"
    assert summary["best"]["energy_per_1k_output_tokens_j"] == out.frontier[0]["energy_per_1k_output_tokens_j"]
    with pytest.raises(FastsimError, match="--objective"):
        run_search(RAW, 20.0, SLOS, SearchSpace(gpus=["H100-SXM"]), tmp_path, objective="speed")
