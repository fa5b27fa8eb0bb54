"""End to end: config -> simulate -> tables, summary, files; CLI behaviour on good and bad input."""
import json
import subprocess
import sys

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from fastsim.cli import app
from fastsim.config import load_config
from fastsim.errors import FastsimError
from fastsim.simulation import simulate

SMALL = {
    "simulation": {"seed": 1},
    "model": "meta-llama/Meta-Llama-3-8B",
    "hardware": {"gpu": "H100-SXM"},
    "engine": {"max_num_seqs": 32},
    "workload": {"num_requests": 60, "clients": [
        {"name": "a", "arrival": {"process": "poisson", "rate": 20.0},
         "prompt_tokens": {"dist": "uniform", "low": 20, "high": 400},
         "output_tokens": {"dist": "uniform", "low": 2, "high": 60}},
        {"name": "b", "arrival": {"process": "batch"}, "num_requests": 5,
         "prompt_tokens": {"dist": "constant", "value": 100}, "output_tokens": {"dist": "constant", "value": 10}}]},
    "slo": {"ttft_ms": 200, "tpot_ms": 30},
}


def write_cfg(tmp_path, cfg=SMALL, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_summary_fields_and_consistency(tmp_path):
    r = simulate(write_cfg(tmp_path))
    s = r.summary
    for k in ("completed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
              "total_input_tokens", "total_output_tokens", "request_goodput"):
        assert k in s
    for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        for stat in ("mean", "median", "std", "p90", "p95", "p99"):
            assert f"{stat}_{m}" in s
    df = r.to_pandas()
    assert len(df) == 60 and s["completed"] == 60
    assert s["total_output_tokens"] == df.output_tokens.sum()
    assert s["request_throughput"] == pytest.approx(60 / df.finish_s.max())
    assert s["mean_ttft_ms"] == pytest.approx(df.ttft_ms.mean())
    assert s["p99_e2el_ms"] == pytest.approx(np.percentile(df.e2el_ms, 99))
    # Mean ITL over all gaps = total decode time / gaps.
    gaps = (df.generated_tokens - 1).sum()
    assert s["mean_itl_ms"] == pytest.approx(((df.finish_s - df.first_token_s) * 1e3).sum() / gaps, rel=1e-9)
    good = ((df.ttft_ms <= 200) & (df.tpot_ms.fillna(0) <= 30)).sum()
    assert s["request_goodput"] == pytest.approx(good / df.finish_s.max())
    assert set(df.client) == {"a", "b"} and set(df.status) == {"finished"}
    assert (df.arrival_s <= df.first_scheduled_s).all() and (df.first_token_s <= df.finish_s).all()


def test_same_seed_bit_identical_outputs(tmp_path):
    p = write_cfg(tmp_path)
    runner = CliRunner()
    for d in ("o1", "o2"):
        assert runner.invoke(app, ["run", str(p), "--out", str(tmp_path / d), "-q"]).exit_code == 0
    t1, t2 = pq.read_table(tmp_path / "o1/requests.parquet"), pq.read_table(tmp_path / "o2/requests.parquet")
    assert t1.equals(t2)
    # Byte for byte: the machine's wall time goes to run.json, not summary.json.
    for name in ("requests.parquet", "summary.json"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
    run = json.loads((tmp_path / "o1/run.json").read_text())
    assert run["wall_time_s"]["vllm"]["wall_time_s"] > 0 and "wall_time_s" not in (tmp_path / "o1/summary.json").read_text()
    other = simulate(load_config(p, ["simulation.seed=2"]))
    assert not np.array_equal(other.requests.column("arrival_s").to_numpy(), t1.column("arrival_s").to_numpy())


@pytest.mark.slow
def test_byte_identical_across_processes_and_modes_differ_only_where_they_should(tmp_path):
    """Two fresh processes (hash seeds differ), same config and seed: identical files. Another
    seed: a different workload."""
    import os

    p = write_cfg(tmp_path)
    for d, hash_seed in (("p1", "1"), ("p2", "2")):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        proc = subprocess.run([sys.executable, "-m", "fastsim.cli", "run", str(p), "-q", "--out", str(tmp_path / d)],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
    for name in ("requests.parquet", "summary.json"):
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes()
    assert subprocess.run([sys.executable, "-m", "fastsim.cli", "run", str(p), "-q", "--out", str(tmp_path / "p3"),
                           "--set", "simulation.seed=5"], capture_output=True).returncode == 0
    assert (tmp_path / "p3/requests.parquet").read_bytes() != (tmp_path / "p1/requests.parquet").read_bytes()


@pytest.mark.parametrize("caching", [False, True])
def test_stepped_mode_gives_exact_modes_results_bit_for_bit(caching):
    """simulation.mode stepped schedules every iteration in full; exact steps steady decoding in O(1)
    each. With a small cache (preemptions) and long outputs (decode stretches), every request's
    row and every summary figure but the engine's own counts and wall time are the same."""
    over = ["workload.num_requests=300", "engine.num_gpu_blocks_override=300", "engine.max_model_len=2048",
            "engine.max_num_seqs=64",
            "workload.clients=[{arrival: {process: poisson, rate: 40.0}, prompt_tokens: {dist: uniform, low: 20, "
            "high: 600}, output_tokens: {dist: uniform, low: 50, high: 500}}]",
            f"engine.enable_prefix_caching={str(caching).lower()}"]
    exact = simulate(load_config(None, over + ["simulation.mode=exact"]))
    stepped = simulate(load_config(None, over + ["simulation.mode=stepped"]))
    assert exact.requests.equals(stepped.requests)
    a, b = exact.summary, stepped.summary
    assert a["preemptions"] > 0 and a["decode_stretch_iterations"] > 0.3 * a["iterations"]
    assert b["decode_stretch_iterations"] == 0
    for s in (a, b):
        del s["wall_time_s"], s["decode_stretch_iterations"]
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # (NaN too)


def test_a_dict_runs_as_its_yaml_file_does(tmp_path):
    import fastsim

    from_file = simulate(str(write_cfg(tmp_path)), ["engine.max_num_seqs=8"])
    from_dict = fastsim.simulate(SMALL, ["engine.max_num_seqs=8"])
    assert from_dict.requests.equals(from_file.requests)
    assert SMALL["engine"]["max_num_seqs"] == 32  # the caller's mapping is left as it was
    with pytest.raises(FastsimError, match="engine.max_num_seqs"):
        fastsim.simulate(SMALL | {"engine": {"max_num_seqs": 0}})


def test_output_read_by_duckdb_and_pandas(tmp_path):
    p = write_cfg(tmp_path)
    res = CliRunner().invoke(app, ["run", str(p), "--out", str(tmp_path / "o"), "--set", "output.timeline=true"])
    assert res.exit_code == 0, res.output
    f = tmp_path / "o" / "requests.parquet"
    n, mean_ttft = duckdb.sql(f"select count(*), avg(ttft_ms) from '{f}' where status = 'finished'").fetchall()[0]
    df = pd.read_parquet(f)
    assert n == len(df) == 60
    assert mean_ttft == pytest.approx(df.ttft_ms.mean())
    tl = pd.read_parquet(tmp_path / "o" / "timeline.parquet")
    assert (tl.kv_blocks_used >= 0).all() and tl.start_s.is_monotonic_increasing


@pytest.mark.parametrize("fmt", ["arrow", "csv"])
def test_other_formats(tmp_path, fmt):
    res = CliRunner().invoke(app, ["run", str(write_cfg(tmp_path)), "--out", str(tmp_path / "o"),
                                   "--format", fmt, "-q"])
    assert res.exit_code == 0, res.output
    df = (pd.read_csv(tmp_path / "o/requests.csv") if fmt == "csv"
          else pd.read_feather(tmp_path / "o/requests.arrow"))
    assert len(df) == 60
    assert not list((tmp_path / "o").glob(".*tmp"))


def test_engine_variants_side_by_side(tmp_path):
    cfg = SMALL | {"engines": [{"name": "wide"}, {"name": "narrow", "max_num_seqs": 2}]}
    r = simulate(write_cfg(tmp_path, cfg))
    assert set(r.summaries) == {"wide", "narrow"}
    df = r.to_pandas()
    a, b = df[df.engine == "wide"], df[df.engine == "narrow"]
    assert np.array_equal(a.arrival_s.values, b.arrival_s.values)  # the identical workload
    assert r.summaries["narrow"]["mean_ttft_ms"] > r.summaries["wide"]["mean_ttft_ms"]
    assert "engines" in r.summary


def test_chunked_prefill_mixes_decodes_and_v0_does_not(tmp_path):
    base = SMALL | {"engines": [{"name": "v1"}, {"name": "v0", "scheduler": "v0"}], "output": {"timeline": True}}
    r = simulate(write_cfg(tmp_path, base))
    v1, v0 = r.timelines["v1"].to_pandas(), r.timelines["v0"].to_pandas()
    mixed = lambda tl: ((tl.prefill_tokens > 0) & (tl.num_decodes > 0)).sum()  # noqa: E731
    assert mixed(v1) > 0 and mixed(v0) == 0


def test_warmup_excludes_early_requests(tmp_path):
    r = simulate(load_config(write_cfg(tmp_path), ["simulation.warmup_s=1.0"]))
    df = r.to_pandas()
    assert r.summary["measured_requests"] == int((df.arrival_s >= 1.0).sum())
    assert r.summary["completed"] == r.summary["measured_requests"]


def test_too_long_requests_are_rejected_with_a_status(tmp_path):
    cfg = SMALL | {"engine": {"max_model_len": 300}}
    r = simulate(write_cfg(tmp_path, cfg))
    df = r.to_pandas()
    long = (df.prompt_tokens + df.output_tokens) > 300
    assert long.any()
    assert (df.status[long] == "rejected").all() and (df.reject_reason[long] == "longer than max_model_len").all()
    assert (df.status[~long] == "finished").all()
    assert r.summary["rejected"] == long.sum()


def test_model_that_does_not_fit_is_rejected_before_simulation(tmp_path):
    with pytest.raises(FastsimError, match=r"141.1 GB of weights.*H100-SXM.*tensor_parallel_size >= 2 fits"):
        simulate(load_config(write_cfg(tmp_path), ["model=meta-llama/Meta-Llama-3-70B"]))


def test_cli_default_run_produces_results(tmp_path):
    res = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "o/summary.json").read_text())
    assert s["completed"] == 1000 and s["mean_tpot_ms"] > 5


def test_cli_validate_and_generate_config(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["generate-config", "-o", str(tmp_path / "g.yaml")])
    assert res.exit_code == 0
    res = runner.invoke(app, ["validate", str(tmp_path / "g.yaml")], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "KV blocks" in res.output and "valid" in res.output


@pytest.mark.parametrize("args,needle", [
    (["--set", "engine.max_num_seqs=0"], "engine.max_num_seqs = 0"),
    (["--set", "engine.max_num_seq=4"], "engine.max_num_seq is not a known option"),
    (["--set", "model=meta-llama/Llama-3-8B"], "closest"),
    (["--set", "hardware.gpu=H100"], "closest: H100-SXM"),
    (["--set", "workload.clients.0.arrival.rate=-1"], "workload.clients.0.arrival.rate = -1"),
    (["--set", "engine.enable_chunked_prefill=false", "--set", "engine.max_num_batched_tokens=2048"],
     "max_num_batched_tokens = 2048 is smaller than max_model_len"),
    (["--set", "nonsense"], "expected key=value"),
    (["--set", "engine.scheduler=v0", "--set", "engine.max_num_batched_tokens=2048"], "under scheduler v0"),
    (["--set", "engine.tensor_parallel_size=3"], "tensor_parallel_size = 3"),
    (["--set", "cluster.router=fastest"], "cluster.router = 'fastest'"),
    (["--set", "workload.clients.0.arrival.rate=.inf"], "should be a finite number"),
    (["--set", "model=./missing/config.json"], "no config.json at"),
    (["--bogus"], "No such option: --bogus"),
    (["--set", "engine.scheduler=v0", "--set", "engine.enable_prefix_caching=true"], "scheduler v1 only"),
    (["--set", "engine.schedule_policy=lpm"], "lpm is SGLang's"),
    (["--set", "engine.max_num_batched_tokens=128"], "max_num_batched_tokens (128) is smaller than max_num_seqs (256)"),
    (["--set", "engine.framework=sglang", "--set", "engine.scheduler=v0"], "scheduler: v0 is vLLM's"),
    (["--set", "cluster.router=prefix_aware", "--set", "engine.data_parallel_size=2"], "prefix_aware"),
    (["--set", "workload.clients.0.conversation.turns.dist=constant"], "workload.clients.0.conversation"),
])
def test_cli_bad_input_is_one_clean_line(tmp_path, args, needle):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "fastsim.cli", "run", "--out", str(out), *args],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr
    assert not out.exists()  # nothing half-written


def test_cli_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("engine: {max_num_seqs: [\n")
    proc = subprocess.run([sys.executable, "-m", "fastsim.cli", "validate", str(p)], capture_output=True, text=True)
    assert proc.returncode == 1 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_every_example_config_validates_and_runs(tmp_path):
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(path, ["workload.num_requests=40"] if "duration_s" not in path.read_text() else
                          ["workload.duration_s=100"])
        r = simulate(cfg)
        for s in r.summaries.values():
            assert s["num_requests"] > 0 and s["measured_requests"] > 0
            assert s["completed"] + s["rejected"] + s["unfinished"] == s["measured_requests"]


def test_default_config_file_matches_builtin_default():
    from pathlib import Path

    from fastsim.config import DEFAULT_CONFIG, Config

    path = Path(__file__).parent.parent / "configs" / "chat_h100.yaml"
    assert load_config(path) == Config(**DEFAULT_CONFIG)


def test_progress_reports_reach_the_finished_count(tmp_path):
    seen = []
    r = simulate(write_cfg(tmp_path), progress=lambda stage, done=0, total=0: seen.append((stage, done, total)))
    sim = [(d, t) for stage, d, t in seen if stage.startswith("simulating")]
    assert sim and sim[-1] == (60, 60) == (r.summary["completed"], r.summary["num_requests"])
    assert all(a[0] <= b[0] for a, b in zip(sim, sim[1:]))  # never goes backwards
