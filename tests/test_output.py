"""A run's output folder: whole, one run's files only, and saying what made it."""
import json
import os
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fastsim import output
from fastsim.config import build_config, load_config
from fastsim.simulation import Result


def result(tokens: int, timeline: bool = False, engines=("vllm",)) -> Result:
    """A stand-in for a run: its request table and summaries agree on the token total."""
    requests = pa.table({"request_id": [0, 1], "generated_tokens": [tokens, tokens]})
    summaries = {name: {"total_output_tokens": 2 * tokens, "wall_time_s": 0.5} for name in engines}
    timelines = {name: pa.table({"t_s": [0.0, 1.0]}) for name in engines} if timeline else {}
    return Result(requests=requests, summaries=summaries, timelines=timelines)


def tokens_agree(out) -> bool:
    table_total = sum(pq.read_table(out / "requests.parquet").column("generated_tokens").to_pylist())
    return table_total == json.loads((out / "summary.json").read_text())["total_output_tokens"]


def listing(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))


def test_a_new_run_replaces_every_file_of_the_previous_one(tmp_path):
    out = tmp_path / "o"
    output.write_result(result(5, timeline=True, engines=("a", "b")), out, "parquet")
    assert listing(out) == ["a", "a/summary.json", "b", "b/summary.json", "requests.parquet", "run.json",
                            "summary.json", "timeline.parquet"]
    # No timeline and one engine now: the old timeline and engine summaries go, not left to be plotted.
    output.write_result(result(7), out, "parquet")
    assert listing(out) == ["requests.parquet", "run.json", "summary.json"] and tokens_agree(out)
    # Another format: the Parquet table of the run before does not stay beside the CSV.
    output.write_result(result(9), out, "csv")
    assert listing(out) == ["requests.csv", "run.json", "summary.json"]
    assert json.loads((out / "run.json").read_text())["files"] == ["requests.csv", "summary.json", "run.json"]


def test_a_folder_an_earlier_version_wrote_loses_its_run_files_only(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    for name in ("requests.arrow", "timeline.parquet", "summary.json", "notes.txt"):
        (out / name).write_text("old")
    (out / "run.json").write_text('{"fastsim_version": "0.0.9"}')  # no list of files
    output.write_result(result(3), out, "parquet")
    assert listing(out) == ["notes.txt", "requests.parquet", "run.json", "summary.json"]


def test_a_folder_no_fastsim_run_wrote_keeps_its_files(tmp_path):
    """Without a run.json the folder is the user's: a new run adds its files and removes nothing."""
    out = tmp_path / "data"
    (out / "plots").mkdir(parents=True)
    for name in ("requests.csv", "timeline.arrow", "plots/latency_cdf.png"):
        (out / name).write_text("mine")
    output.write_result(result(3), out, "parquet")
    assert listing(out) == ["plots", "plots/latency_cdf.png", "requests.csv", "requests.parquet", "run.json",
                            "summary.json", "timeline.arrow"]


def test_a_run_json_listing_paths_outside_the_folder_removes_nothing_there(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    victim = tmp_path / "keep.txt"
    victim.write_text("mine")
    (out / "run.json").write_text(json.dumps({"files": ["../keep.txt", str(victim), "."]}))
    output.write_result(result(3), out, "parquet")
    assert victim.read_text() == "mine"


def test_ctrl_c_while_staging_leaves_the_previous_run_whole(tmp_path, monkeypatch):
    out = tmp_path / "o"
    output.write_result(result(5, timeline=True), out, "parquet")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = output._write_table

    def interrupted(table, path, fmt):
        if path.name.startswith("timeline"):  # the request table is staged, the timeline not yet
            raise KeyboardInterrupt
        real(table, path, fmt)

    monkeypatch.setattr(output, "_write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        output.write_result(result(7, timeline=True), out, "parquet")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before and tokens_agree(out)


def test_ctrl_c_during_the_swap_waits_for_the_whole_set(tmp_path, monkeypatch):
    out = tmp_path / "o"
    output.write_result(result(5), out, "parquet")
    real = os.replace
    calls = []

    def replace(src, dst):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the first file goes in
        calls.append(dst)
        real(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            output.write_result(result(7), out, "parquet")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(calls) == 3 and tokens_agree(out)
    assert json.loads((out / "summary.json").read_text())["total_output_tokens"] == 14


def test_what_killed_writes_left_is_cleaned_up(tmp_path):
    out = tmp_path / "o"
    dead = out / f"{output.STAGING_PREFIX}999999999-x1"  # no such process
    live = out / f"{output.STAGING_PREFIX}{os.getppid()}-y2"  # a writer still running
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "requests.parquet").write_text("partial")
    (out / ".requests.parquet.ab12.tmp").write_text("partial")
    (out / ".mine.tmp").write_text("not fastsim's")
    output.write_result(result(3), out, "parquet")
    assert not dead.exists() and live.exists() and (out / ".mine.tmp").exists()
    assert not (out / ".requests.parquet.ab12.tmp").exists()


def test_the_folder_says_what_made_it_and_its_config_runs_again(tmp_path):
    cfg = load_config(None, ["workload.num_requests=50", "engine.max_num_seqs=16"])
    out = tmp_path / "o"
    written = output.write_result(result(3), out, "parquet", config=cfg, command=["fastsim", "run", "-q"],
                                  started_at=0.0)
    assert out / "config.yaml" in written
    run = json.loads((out / "run.json").read_text())
    from fastsim import __version__
    assert run["fastsim_version"] == __version__ and run["command"] == "fastsim run -q"
    assert run["started_at"] == "1970-01-01T00:00:00+00:00" and run["finished_at"] > run["started_at"]
    assert run["seed"] == 0 and run["wall_time_s"] == {"vllm": {"wall_time_s": 0.5}}
    assert "wall_time_s" not in json.loads((out / "summary.json").read_text())
    again = build_config(yaml.safe_load((out / "config.yaml").read_text()))
    assert again == cfg and again.engine.max_num_seqs == 16


def _served(arrival, finish, queue_ms):
    import numpy as np
    return pa.table({"arrival_s": np.asarray(arrival, float), "finish_s": np.asarray(finish, float),
                     "queue_ms": np.asarray(queue_ms, float)})


def test_load_report_tells_a_growing_backlog_from_a_busy_steady_state():
    import numpy as np

    from fastsim.metrics import load_report

    n = 100
    arrival = np.arange(n) / 10.0  # 10 req/s for 9.9 s
    # Served one every 0.2 s from the start: 5 req/s; request i waits 0.1 i s (the last tenth ~9.5 s).
    start = 0.2 * np.arange(n)
    r = load_report(_served(arrival, start + 0.05, (start - arrival) * 1e3), np.ones(n, bool))
    assert r["offered_request_rate"] == pytest.approx(10.0)
    assert r["served_request_rate"] == pytest.approx(n / (0.2 * (n - 1) + 0.05))
    assert r["late_queue_ms"] == pytest.approx(np.mean(0.1 * np.arange(90, 100)) * 1e3)
    assert r["overloaded"]
    # Kept up: each served on arrival.
    r = load_report(_served(arrival, arrival + 0.05, np.zeros(n)), np.ones(n, bool))
    assert r["served_request_rate"] == pytest.approx(n / 9.95) and not r["overloaded"]
    # Still waiting at the end counts as having waited until then; closed-loop rows are not looked at.
    finish = np.where(np.arange(n) < 90, start + 0.05, np.nan)
    r = load_report(_served(arrival, finish, np.where(np.isnan(finish), np.nan, (start - arrival) * 1e3)),
                    np.ones(n, bool))
    assert r["late_queue_ms"] == pytest.approx(np.mean(finish[89] - arrival[90:]) * 1e3) and r["overloaded"]
    assert load_report(_served(arrival, start + 0.05, (start - arrival) * 1e3), np.zeros(n, bool)) == {}
