"""fastsim sweep: which points, each point's result against a direct simulate() of its config,
failures recorded, re-runs skipping what is done, parallel runs equal to serial ones."""
import json
import math

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fastsim.cli import app
from fastsim.config import Sweep, SweepRange
from fastsim.errors import FastsimError
from fastsim.simulation import simulate
from fastsim.sweep import (check_values, flat_summary, parse_cli_parameter, point_count, range_values, run_sweep,
                           sweep_points)

BASE = {"model": "meta-llama/Meta-Llama-3-8B", "hardware": {"gpu": "H100-SXM"},
        "workload": {"num_requests": 60, "clients": [{"arrival": {"process": "poisson", "rate": 4.0},
                                                      "dataset": {"name": "sharegpt"}}]},
        "slo": {"ttft_ms": 500}}


def test_range_includes_stop_and_keeps_integers():
    assert range_values(SweepRange(start=2, stop=10, step=4)) == [2, 6, 10]
    assert range_values(SweepRange(start=0.5, stop=0.9, step=0.1)) == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert range_values(SweepRange(start=1, stop=2, step=5)) == [1]


def test_cli_parameters():
    assert parse_cli_parameter("engine.max_num_seqs=64,128", "--grid") == ("engine.max_num_seqs", [64, 128])
    assert parse_cli_parameter("hardware.gpu=H100-SXM,A100-SXM-80GB", "--grid")[1] == ["H100-SXM", "A100-SXM-80GB"]
    key, r = parse_cli_parameter("workload.clients.0.arrival.rate=1:3:0.5", "--grid")
    assert key == "workload.clients.0.arrival.rate" and range_values(r) == [1, 1.5, 2, 2.5, 3]
    for bad in ("engine.max_num_seqs", "=1,2", "x=3:1:1"):
        with pytest.raises(FastsimError):
            parse_cli_parameter(bad, "--grid")
    with pytest.raises(FastsimError, match="stop 1 is below start 3"):
        parse_cli_parameter("x=3:1:1", "--grid")


def test_grid_zip_random_points():
    grid = sweep_points(Sweep(parameters={"a": [1, 2, 3], "b": ["x", "y"]}), BASE)
    assert [p.params for p in grid] == [{"a": a, "b": b} for a in (1, 2, 3) for b in ("x", "y")]
    assert len({p.point_id for p in grid}) == 6 and [p.index for p in grid] == list(range(6))
    zipped = sweep_points(Sweep(mode="zip", parameters={"a": [1, 2], "b": ["x", "y"]}), BASE)
    assert [p.params for p in zipped] == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    with pytest.raises(FastsimError, match="as many values"):
        sweep_points(Sweep(mode="zip", parameters={"a": [1, 2], "b": ["x"]}), BASE)
    spec = {"mode": "random", "samples": 50, "parameters": {"a": [1, 2, 3],
                                                            "r": {"low": 1, "high": 100, "log": True}}}
    r1, r2 = sweep_points(Sweep(**spec), BASE), sweep_points(Sweep(**spec), BASE)
    assert [p.params for p in r1] == [p.params for p in r2]  # seeded
    assert [p.params for p in r1] != [p.params for p in sweep_points(Sweep(**spec, seed=1), BASE)]
    assert {p.params["a"] for p in r1} == {1, 2, 3} and all(1 <= p.params["r"] <= 100 for p in r1)
    # the same point of another base config is another point; a longer sweep keeps the ids it shares
    other = sweep_points(Sweep(parameters={"a": [1, 2, 3], "b": ["x", "y"]}), {**BASE, "model": "x"})
    assert not {p.point_id for p in grid} & {p.point_id for p in other}
    longer = sweep_points(Sweep(parameters={"a": [1, 2, 3, 4], "b": ["x", "y"]}),
                          {**BASE, "sweep": {"parameters": {"a": [1, 2, 3, 4]}}, "output": {"dir": "elsewhere"}})
    assert {p.point_id for p in grid} < {p.point_id for p in longer}


def test_each_row_is_the_simulation_of_its_config_and_failures_are_recorded(tmp_path):
    spec = Sweep(parameters={"engine.max_num_seqs": [8, 64], "engine.gpu_memory_utilization": [0.1, 0.9]})
    points = sweep_points(spec, BASE)
    out = run_sweep(BASE, points, tmp_path, jobs=1)
    assert (out.total, out.ran, out.skipped, out.failed) == (4, 4, 0, 2)  # 0.1 of an H100 holds no 8B model
    table = pq.read_table(out.table_path)
    assert json.loads(table.schema.metadata[b"fastsim.swept_keys"]) == list(spec.parameters)
    rows = table.to_pylist()
    assert [r["point"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["status"] == ("failed" if r["engine.gpu_memory_utilization"] == 0.1 else "ok")
        if r["status"] == "failed":
            assert "gpu_memory_utilization 0.1" in r["error"] and r["engine"] is None
            continue
        direct = simulate(_cfg(r))  # an independent run of the same config
        expect = flat_summary(direct.summaries["vllm"])
        for k, v in expect.items():
            if k == "engine":
                continue
            got = r[k]
            assert (got is None and (v is None or (isinstance(v, float) and math.isnan(v)))) or got == v, k
        assert r["slo_ttft_ms"] == 500 and "wall_time_s" not in r


def _cfg(row):
    from fastsim.sweep import point_config
    return point_config(BASE, {"engine.max_num_seqs": row["engine.max_num_seqs"],
                               "engine.gpu_memory_utilization": row["engine.gpu_memory_utilization"]})


def test_rerun_skips_done_points_and_runs_only_what_is_missing(tmp_path):
    points = sweep_points(Sweep(parameters={"engine.max_num_seqs": [8, 16, 32]}), BASE)
    first = run_sweep(BASE, points, tmp_path, jobs=1)
    before = pq.read_table(first.table_path)
    again = run_sweep(BASE, points, tmp_path, jobs=1)
    assert (again.ran, again.skipped) == (0, 3)
    (tmp_path / "points" / f"{points[1].point_id}.json").unlink()
    third = run_sweep(BASE, points, tmp_path, jobs=1)
    assert (third.ran, third.skipped) == (1, 2)
    assert pq.read_table(third.table_path).equals(before)


def test_parallel_workers_give_the_serial_table_and_requests_are_a_dataset(tmp_path):
    import duckdb

    points = sweep_points(Sweep(parameters={"workload.clients.0.arrival.rate": [2, 4, 8],
                                            "engine.max_num_seqs": [16, 128]}), BASE)
    serial = run_sweep(BASE, points, tmp_path / "a", jobs=1)
    parallel = run_sweep(BASE, points, tmp_path / "b", jobs=2, save_requests=True)
    assert pq.read_table(parallel.table_path).equals(pq.read_table(serial.table_path))
    n = duckdb.sql(f"select point_id, count(*) as n from read_parquet('{tmp_path / 'b'}/requests/*/*.parquet', "
                   "hive_partitioning=true) group by point_id").fetchall()
    assert sorted(n) == sorted((p.point_id, 60) for p in points)


def test_cli_sweep_and_its_errors(tmp_path):
    runner = CliRunner()
    cfg = tmp_path / "c.yaml"
    import yaml
    cfg.write_text(yaml.safe_dump({**BASE, "sweep": {"parameters": {"engine.max_num_seqs": [16, 32]}}}))
    res = runner.invoke(app, ["sweep", str(cfg), "-o", str(tmp_path / "o"), "-j", "1"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "2 points: 2 run" in res.output and (tmp_path / "o" / "sweep.parquet").exists()
    res = runner.invoke(app, ["sweep", str(cfg), "-o", str(tmp_path / "o"), "--grid", "engine.max_num_seq=1,2"])
    assert res.exit_code != 0 and isinstance(res.exception, FastsimError)
    assert "max_num_seq is not a known option" in str(res.exception)
    res = runner.invoke(app, ["sweep", "-o", str(tmp_path / "o")])
    assert isinstance(res.exception, FastsimError) and "nothing to vary" in str(res.exception)


def test_values_wrong_on_their_own_are_refused_before_any_point_runs(tmp_path):
    runner = CliRunner()
    for grid, want in ((["engine.max_num_seqs=64,abc"], "engine.max_num_seqs = 'abc': Input should be a valid integer"),
                       (["engine.max_num_seqs=0:64:32"], "engine.max_num_seqs = 0: Input should be greater than"),
                       (["workload.clients.0.arrival.rate=2,-1"], "arrival.rate = -1: Input should be greater")):
        args = ["sweep", "-o", str(tmp_path / "o")] + [a for g in grid for a in ("--grid", g)]
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and isinstance(res.exception, FastsimError) and want in str(res.exception), res
    assert not (tmp_path / "o").exists()
    # Wrong only together with the base (more tokens per step than max_num_seqs allows is fine, but a
    # budget under max_model_len without chunking is not): such a value fails its points, not the sweep.
    check_values(Sweep(parameters={"engine.max_num_batched_tokens": [512, 8192]}),
                 {"engine": {"enable_chunked_prefill": False}})


def test_a_sweep_of_more_points_than_the_limit_needs_yes(tmp_path, monkeypatch):
    grid = Sweep(parameters={"a": SweepRange(start=1, stop=200, step=1), "b": [1, 2, 3]})
    assert point_count(grid) == 600 == len(sweep_points(grid, BASE))
    assert point_count(Sweep(mode="zip", parameters={"a": [1, 2], "b": [3, 4]})) == 2
    assert point_count(Sweep(mode="random", samples=7, parameters={"a": {"low": 1, "high": 2}})) == 7
    runner = CliRunner()
    args = ["sweep", "-o", str(tmp_path / "o"), "--grid", "engine.max_num_seqs=1:200:1",
            "--grid", "engine.max_num_batched_tokens=2048:8192:64"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "19,400 points (grid of 200 x 97)" in str(res.exception) and "--yes" in str(res.exception)
    import fastsim.sweep as sw
    ran = []
    monkeypatch.setattr(sw, "run_sweep", lambda raw, points, *a, **k: ran.append(len(points)) or 1 / 0)
    runner.invoke(app, args + ["--yes"])
    assert ran == [19400]


@pytest.mark.slow
def test_ray_executor_gives_the_local_table(tmp_path):
    """On a local Ray instance (CI installs Ray with the test extras): the same rows, bit for bit."""
    pytest.importorskip("ray")
    points = sweep_points(Sweep(parameters={"engine.max_num_seqs": [8, 64],
                                            "engine.gpu_memory_utilization": [0.1, 0.9]}), BASE)
    local = run_sweep(BASE, points, tmp_path / "local", jobs=2)
    on_ray = run_sweep(BASE, points, tmp_path / "ray", executor="ray", jobs=2)
    assert (on_ray.ran, on_ray.failed) == (4, 2)
    assert pq.read_table(on_ray.table_path).equals(pq.read_table(local.table_path))


def test_example_sweep_config_has_the_points_it_says():
    from pathlib import Path

    from fastsim.config import load_config, read_config_file

    path = Path(__file__).parent.parent / "configs" / "sweep_rate_and_batch.yaml"
    cfg = load_config(path)
    points = sweep_points(cfg.sweep, read_config_file(path))
    assert len(points) == 10 * 2 * 3 == 60
    assert points[0].params == {"workload.clients.0.arrival.rate": 1, "engine.max_num_seqs": 64,
                                "engine.max_num_batched_tokens": 2048}
