"""fastsim capacity: SLO parsing, rate scaling, and the bisection against a brute-force scan."""
import math

import pytest
import yaml
from typer.testing import CliRunner

from fastsim.capacity import engine_configs, find_capacity, judge, offered_rate, parse_slo, scaled
from fastsim.cli import app
from fastsim.config import build_config
from fastsim.errors import FastsimError
from fastsim.simulation import simulate

RAW = {"model": "meta-llama/Meta-Llama-3-8B", "hardware": {"gpu": "H100-SXM"},
       "workload": {"num_requests": 150, "clients": [
           {"arrival": {"process": "poisson", "rate": 3.0}, "dataset": {"name": "sharegpt"}},
           {"name": "b", "arrival": {"process": "gamma", "rate": 1.0, "cv": 2.0},
            "prompt_tokens": {"dist": "constant", "value": 500}, "output_tokens": {"dist": "constant", "value": 50}}]}}


def test_parse_slo():
    s = parse_slo("ttft_ms:p99=500")
    assert (s.metric, s.stat, s.limit, s.key) == ("ttft_ms", "p99", 500.0, "p99_ttft_ms")
    assert parse_slo("tpot_ms=50").key == "p99_tpot_ms" and parse_slo("e2el_ms:mean=2e3").limit == 2000
    for bad, says in (("ttft:p99=5", "not one of"), ("ttft_ms:p42=5", "statistic"), ("ttft_ms:p99=-1", "positive"),
                      ("ttft_ms<500", "expected")):
        with pytest.raises(FastsimError, match=says):
            parse_slo(bad)


def test_rates_scale_together():
    assert offered_rate(build_config(RAW)) == 4.0
    s = scaled(RAW, 2.5)
    assert [c["arrival"]["rate"] for c in s["workload"]["clients"]] == [7.5, 2.5]
    assert RAW["workload"]["clients"][0]["arrival"]["rate"] == 3.0  # the input is not changed
    batch = {**RAW, "workload": {"num_requests": 10, "clients": [{"arrival": {"process": "batch"},
                                                                  "dataset": {"name": "sharegpt"}}]}}
    with pytest.raises(FastsimError, match="batch"):
        offered_rate(build_config(batch))
    # a trace replaying its own timestamps is scaled through trace.rate, and needs one
    trace = {**RAW, "workload": {"num_requests": 10, "clients": [
        {"trace": {"format": "azure", "file": "tests/fixtures/azure_conv_200.csv", "rate": 2.0}},
        {"arrival": {"process": "poisson", "rate": 1.0}, "dataset": {"name": "sharegpt"}}]}}
    assert offered_rate(build_config(trace)) == 3.0
    s = scaled(trace, 2.0)["workload"]["clients"]
    assert (s[0]["trace"]["rate"], s[1]["arrival"]["rate"]) == (4.0, 2.0)
    del trace["workload"]["clients"][0]["trace"]["rate"]
    with pytest.raises(FastsimError, match="trace.rate"):
        offered_rate(build_config(trace))


def test_judge_reads_the_summary_fields():
    s = {"unfinished": 0, "completed": 10, "p99_ttft_ms": 400.0, "mean_tpot_ms": float("nan")}
    assert judge(s, [parse_slo("ttft_ms:p99=500")]) == ""
    assert "p99_ttft_ms = 400 > 300" in judge(s, [parse_slo("ttft_ms:p99=300")])
    assert "undefined" in judge(s, [parse_slo("tpot_ms:mean=50")])
    assert "unfinished" in judge({**s, "unfinished": 1}, [parse_slo("ttft_ms:p99=500")])


# Fixed lengths: latency then grows steadily with the rate, as bisection assumes (with ShareGPT's
# lengths and a few hundred requests p99 TTFT is the longest prompt's prefill, flat in the rate).
STEADY = {**RAW, "workload": {"num_requests": 400, "clients": [
    {"arrival": {"process": "poisson", "rate": 10.0}, "prompt_tokens": {"dist": "constant", "value": 2000},
     "output_tokens": {"dist": "constant", "value": 200}}]}}


def test_bisection_agrees_with_a_scan_of_rates():
    slos = [parse_slo("ttft_ms:p99=400"), parse_slo("tpot_ms:p99=40")]
    cap = find_capacity(STEADY, "vllm", slos, tolerance=0.01)
    assert cap.rate is not None
    hi = min(p.rate for p in cap.probes if not p.meets and p.rate > cap.rate)
    assert hi / cap.rate - 1 <= 0.01 + 1e-12  # bracketed within the tolerance
    # An independent scan of the rate, simulating each directly: the SLOs hold below the answer
    # and fail above it.
    rates = [cap.rate * f for f in (0.5, 0.8, 0.95, 1.0, 1.05, 1.25, 1.6)]
    meets = [judge(simulate(build_config(scaled(STEADY, r / 10.0))).summaries["vllm"], slos) == "" for r in rates]
    assert meets == [True, True, True, True, False, False, False]


def test_unreachable_slo_and_several_engines(tmp_path):
    cap = find_capacity(RAW, "vllm", [parse_slo("ttft_ms:p99=1")])
    assert cap.rate is None and all(not p.meets for p in cap.probes)
    two = {**RAW, "engines": [{"name": "small", "max_num_seqs": 4}, {"max_num_seqs": 256}]}
    assert [n for n, _ in engine_configs(two)] == ["small", "engine1"]
    caps = {n: find_capacity(r, n, [parse_slo("ttft_ms:p99=1000")]).rate for n, r in engine_configs(two)}
    assert caps["small"] < caps["engine1"]  # 4 running requests at most serve fewer


def test_cli_capacity(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(RAW))
    res = CliRunner().invoke(app, ["capacity", str(cfg), "--slo", "ttft_ms:p99=500", "-o", str(tmp_path)],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    import json
    data = json.loads((tmp_path / "capacity.json").read_text())
    rate = data["engines"][0]["max_request_rate"]
    assert rate > 0 and math.isclose(rate, max(p["request_rate"] for p in data["engines"][0]["probes"] if p["meets"]))
    res = CliRunner().invoke(app, ["capacity", str(cfg)])
    assert isinstance(res.exception, FastsimError) and "--slo" in str(res.exception)
