import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from fastsim.cli import app
from fastsim.errors import FastsimError

runner = CliRunner()


def test_models_lists_catalog():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0
    assert "Meta-Llama-3-8B" in res.output and "Qwen2.5-72B" in res.output


def test_gpus_lists_catalog():
    res = runner.invoke(app, ["gpus"], terminal_width=200)
    assert res.exit_code == 0
    assert "H100-SXM" in res.output and "MI300X" in res.output


def test_user_error_is_one_line_and_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastsim.cli", "calibrate", str(tmp_path / "nope.csv"),
                           "--gpu", "H100-SXM"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "cannot open" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "fastsim.cli", "calibrate", "x.csv", "--gpu", "H1OO"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "closest" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_says_it_compiles_when_the_cache_lacks_the_kernels(monkeypatch):
    """A cold cache: the first stage reported is the compile, and the kernels are warmed before the
    workload; a warm cache: no such stage."""
    import fastsim.simulation as sim

    stages, warmed = [], []
    monkeypatch.setattr(sim, "warm_up", lambda: warmed.append(True))
    for compiled in (False, True):
        stages.clear()
        monkeypatch.setattr(sim, "kernels_compiled", lambda: compiled)
        monkeypatch.setattr(sim, "_kernels_checked", False)  # (as in a fresh process)
        sim.simulate(None, ["workload.num_requests=5"], progress=lambda stage, done=0, total=0: stages.append(stage))
        assert (stages[0] == sim.COMPILING) is (not compiled)
        assert "generating workload" in stages
    assert warmed == [True]


def test_warmup_command_reports_the_kernels_ready():
    r = runner.invoke(app, ["warmup"])
    assert r.exit_code == 0, r.output
    assert "simulation kernels" in r.output and " compiled (" in r.output
    from fastsim.engine import kernels_compiled

    assert kernels_compiled()


def test_config_mistakes_yaml_hides_are_refused_in_one_line(tmp_path):
    """A key given twice (YAML keeps the last), true where a number goes (pydantic reads 1), and a
    binary file: each a one-line error naming it, exit 1, no traceback."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("engine:\n  max_num_seqs: 64\n  max_num_seqs: 128\n")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)))
    for args, want in ((["validate", str(dup)], "key 'max_num_seqs' is given twice"),
                       (["validate", "--set", "workload.num_requests=true"], "num_requests: true is a yes/no value"),
                       (["run", str(binary)], "is not a text file")):
        r = runner.invoke(app, args)  # (the CLI's entry point prints a FastsimError as one line)
        assert r.exit_code == 1 and isinstance(r.exception, FastsimError) and want in str(r.exception), (args, r)
    assert runner.invoke(app, ["validate", "--set", "engine.enable_prefix_caching=true"]).exit_code == 0


def test_output_folder_problems_are_refused_before_any_work(tmp_path):
    """--out naming a file, or a folder under a file: one line, exit 1, before the simulation (or the
    sweep's or capacity search's runs); nothing written."""
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for args in (["run", "--out", str(a_file)], ["run", "--out", str(a_file / "sub")],
                 ["sweep", "--grid", "engine.max_num_seqs=8,16", "--out", str(a_file)],
                 ["capacity", "--slo", "ttft_ms:p99=500", "--out", str(a_file)]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and isinstance(r.exception, FastsimError), (args, r)
        assert "--out / output.dir" in str(r.exception) and str(a_file) in str(r.exception)
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_quick_flags_build_a_vllm_bench_serve_workload(tmp_path):
    """--max-concurrency: a closed loop of that many; --input-len/--output-len: fixed lengths at
    --request-rate; --num-prompts; mistakes refused in one line."""
    import pyarrow.parquet as pq

    out = tmp_path / "c"
    r = runner.invoke(app, ["run", "-q", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "H100-SXM",
                            "--max-concurrency", "4", "--num-prompts", "30", "--out", str(out)])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out / "requests.parquet").to_pandas()
    assert len(t) == 30 and (t["arrival_s"] == 0).sum() == 4 and t["session"].nunique() == 4
    out = tmp_path / "f"
    r = runner.invoke(app, ["run", "-q", "--input-len", "100", "--output-len", "20", "--request-rate", "5",
                            "--num-prompts", "25", "--out", str(out)])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out / "requests.parquet").to_pandas()
    assert len(t) == 25 and (t["prompt_tokens"] == 100).all() and (t["output_tokens"] == 20).all()
    assert (t["arrival_s"].diff().dropna() > 0).all()  # Poisson arrivals, not all at once
    # vllm bench serve's own send times (its --seed 0): rescaled so the last leaves at 25 / 5 s
    assert t["arrival_s"].max() == pytest.approx(5.0, rel=1e-12)
    out = tmp_path / "g"
    r = runner.invoke(app, ["run", "-q", "--input-len", "100", "--output-len", "20", "--request-rate", "5",
                            "--burstiness", "0.25", "--seed", "7", "--num-prompts", "400", "--out", str(out)])
    assert r.exit_code == 0, r.output
    gaps = np.diff(np.sort(pq.read_table(out / "requests.parquet").column("arrival_s").to_numpy()))
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.2)  # cv = 1 / sqrt(burstiness)
    for args, want in ((["--input-len", "100"], "give both"),
                       (["--max-concurrency", "4", "--request-rate", "2"], "not modelled yet"),
                       (["--burstiness", "0.5"], "--burstiness shapes the gaps of a finite --request-rate")):
        r = runner.invoke(app, ["run", "-q", *args])
        assert r.exit_code == 1 and isinstance(r.exception, FastsimError) and want in str(r.exception)


def test_validate_checks_what_run_checks(tmp_path):
    """A missing or malformed trace and a run too large for this machine: refused by validate as by
    run, in one line, before anything is simulated."""
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    for trace, want in ((tmp_path / "missing.csv", "No such file"), (bad, "not an Azure trace")):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"workload:\n  num_requests: 10\n  clients:\n    - trace: {{format: azure, file: {trace}}}\n")
        for cmd in ("validate", "run"):
            r = runner.invoke(app, [cmd, str(cfg), *(["--out", str(tmp_path / "o")] if cmd == "run" else [])])
            assert r.exit_code == 1 and isinstance(r.exception, FastsimError) and want in str(r.exception), (cmd, r)
    r = runner.invoke(app, ["validate", "--set", "workload.num_requests=100000000000"])
    assert r.exit_code == 1 and "GB of memory" in str(r.exception)
    assert not (tmp_path / "o").exists()


def test_requests_no_replica_can_serve_are_said_and_a_run_of_nothing_else_refused(tmp_path):
    """Llama-3-8B's 8,192-token context: prompts of 8,000 + 200 answer tokens cannot be served."""
    lengths = ["--set", "workload.clients.0.prompt_tokens={dist: uniform, low: 7000, high: 9000}",
               "--set", "workload.clients.0.output_tokens={dist: constant, value: 200}",
               "--set", "workload.clients.0.dataset=null", "--set", "workload.num_requests=200"]
    r = runner.invoke(app, ["run", "-q", *lengths, "--out", str(tmp_path / "some")])
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq
    t = pq.read_table(tmp_path / "some" / "requests.parquet").to_pandas()
    over = (t["prompt_tokens"] + t["output_tokens"] > 8192)
    assert 0 < over.sum() < len(t) and (t.loc[over, "status"] == "rejected").all()
    assert f"{over.sum()} of 200 requests are rejected" in r.output and "max_model_len" in r.output
    r = runner.invoke(app, ["validate", *lengths])
    assert r.exit_code == 0 and f"{over.sum()} of 200 requests are rejected" in r.output
    r = runner.invoke(app, ["run", "-q", "--input-len", "9000", "--output-len", "10", "--num-prompts", "5",
                            "--out", str(tmp_path / "none")])
    assert r.exit_code == 1 and isinstance(r.exception, FastsimError)
    assert "all 5 requests would be rejected" in str(r.exception) and "9,010 tokens" in str(r.exception)
    assert not (tmp_path / "none").exists()
    too_long = ["--set", "workload.clients.0.prompt_tokens={dist: constant, value: 9000}"]
    r = runner.invoke(app, ["validate", *lengths, *too_long])
    assert r.exit_code == 1 and "all 200 requests would be rejected" in str(r.exception)  # as run refuses it


def test_what_a_vllm_bench_serve_user_reaches_for_first(tmp_path):
    """--version and -h; -q on every command; vLLM's totals and percentiles in the summary, and the
    SLO the goodput counted; tables within 80 columns, swept values never cut to '…'."""
    from fastsim import __version__

    for args in (["--version"], ["-V"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and r.output.strip() == f"fastsim {__version__}"
    assert runner.invoke(app, ["run", "-h"]).exit_code == 0
    names = [c.name for c in app.registered_commands]
    assert len(names) == 12
    for name in names:
        r = runner.invoke(app, [name, "--help"], terminal_width=200)
        assert "--quiet" in r.output and "-q" in r.output, name
    r = runner.invoke(app, ["gpus", "-q"])
    assert r.exit_code == 0 and "H100-SXM" in r.output.split("\n") and "│" not in r.output
    r = runner.invoke(app, ["run", "--num-prompts", "60", "--set", "slo.ttft_ms=200", "--out", str(tmp_path / "r")],
                      terminal_width=80)
    assert r.exit_code == 0, r.output
    for label in ("total input tokens", "total generated tokens", "median ITL (ms)", "median E2EL (ms)",
                  "goodput: requests meeting ttft:200"):
        assert label in r.output, label
    assert max(len(line) for line in r.output.splitlines()) <= 80
    r = runner.invoke(app, ["sweep", "-o", str(tmp_path / "s"), "-j", "1", "--grid", "engine.max_num_seqs=16,64",
                            "--grid", "workload.clients.0.arrival.rate=2,8", "--set", "workload.num_requests=50"],
                      terminal_width=80)
    assert r.exit_code == 0, r.output
    table = [line for line in r.output.splitlines() if line.startswith("│")]
    assert len(table) == 4 and all("…" not in line and len(line) <= 80 for line in table)
    assert table[0].split("│")[1].strip() == "16" and table[1].split("│")[2].strip() == "8"
