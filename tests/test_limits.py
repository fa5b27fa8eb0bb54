"""Limits: runs too big for memory are refused up front with the estimate; a wall-clock budget stops a
run cleanly with every request accounted for; Ctrl-C stops the kernel before leaving."""
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fastsim.config import load_config
from fastsim.errors import FastsimError
from fastsim.kernel_run import WallBudget, run_polled
from fastsim.planning import (BASE_BYTES, BYTES_PER_REQUEST, BYTES_PER_REQUEST_PER_ENGINE, available_memory_bytes,
                              check_memory, expected_requests)
from fastsim.simulation import simulate


def test_a_run_too_big_for_memory_is_refused_with_the_estimate():
    n = 10**12
    cfg = load_config(None, [f"workload.num_requests={n}"])
    need = BASE_BYTES + n * (BYTES_PER_REQUEST + BYTES_PER_REQUEST_PER_ENGINE)
    if available_memory_bytes() is None:
        pytest.skip("no /proc/meminfo here")
    t0 = time.perf_counter()
    with pytest.raises(FastsimError, match=rf"workload.num_requests: 1,000,000,000,000 requests need about "
                                           rf"{need / 1e9:.1f} GB") as e:
        simulate(cfg)
    assert time.perf_counter() - t0 < 5 and "\n" not in str(e.value)


def test_expected_requests_from_rates_and_duration():
    cfg = load_config(None, ["workload.num_requests=null", "workload.duration_s=100",
                             "workload.clients=[{arrival: {process: poisson, rate: 3.0}, dataset: {name: sharegpt}}, "
                             "{arrival: {process: batch}, num_requests: 50, dataset: {name: sharegpt}}]"])
    assert expected_requests(cfg) == 350
    check_memory(cfg, 2)  # small: passes


def test_cli_refuses_a_huge_run_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastsim.cli", "run", "-q", "--out", str(tmp_path),
                           "--set", "workload.num_requests=1000000000000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "GB of memory" in proc.stderr and not list(tmp_path.iterdir())


def test_wall_clock_budget_stops_cleanly_and_accounts_for_every_request():
    cfg = load_config(None, ["workload.num_requests=400000", "simulation.mode=exact", "simulation.max_wall_time_s=0.2",
                             "workload.clients.0.arrival.rate=4.5"])
    r = simulate(cfg)
    s, t = r.summary, r.requests.to_pandas()
    assert s["stopped_by_wall_time_budget"] is True
    assert len(t) == 400000 and set(t.status) <= {"finished", "unfinished", "rejected"}
    assert s["unfinished"] > 0 and s["completed"] + s["rejected"] + s["unfinished"] == 400000
    done = t[t.status == "finished"]
    assert (done.finish_s >= done.first_token_s).all() and (done.generated_tokens == done.output_tokens).all()
    assert t.request_id.nunique() == 400000  # none lost
    quick = simulate(load_config(None, ["workload.num_requests=50", "simulation.max_wall_time_s=60"])).summary
    assert quick["stopped_by_wall_time_budget"] is False and quick["completed"] == 50


def test_kernel_stops_when_asked():
    """progress[1] set before the run: nothing is simulated, every request ends unfinished."""
    from fastsim.engine import enums as E
    from fastsim.kernel_run import run_pools
    from fastsim.planning import plan_engines
    from fastsim.workload import generate_workload

    cfg = load_config(None, ["workload.num_requests=100"])
    model, _, plans = plan_engines(cfg)
    w = generate_workload(cfg.workload, 0)
    seen = []

    budget = WallBudget(deadline=0.0)  # already past
    out = run_pools(cfg, model, plans[0][1], w, np.ones(100, bool), np.zeros(100, bool), seen.append, budget=budget)
    assert budget.hit and (out.status == E.UNFINISHED).all() and seen[-1] == 0


def test_ctrl_c_stops_the_kernel_before_returning():
    progress = np.zeros(2, np.int64)
    stopped = threading.Event()

    def kernel(progress):
        while not progress[1]:
            time.sleep(0.01)
        stopped.set()
        return "done"

    def report(done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_polled(kernel, (progress,), progress, report, interval_s=0.01)
    assert stopped.is_set() and progress[1] == 1


def _default_sigint():
    # A shell that starts jobs in the background ignores SIGINT in them, and the ignoring is inherited:
    # give the child Python the default disposition, so that it installs its KeyboardInterrupt handler.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when(proc, ready, timeout_s=240.0):
    import signal

    t0 = time.monotonic()
    while not ready() and proc.poll() is None and time.monotonic() - t0 < timeout_s:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=120)


def test_ctrl_c_during_a_run_leaves_no_half_written_file(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "fastsim.cli", "run", "-q", "--out", str(out), "--set",
                             "workload.num_requests=3000000", "--set", "simulation.mode=exact"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    code = _interrupt_when(proc, lambda: False, timeout_s=4.0)
    assert code == 130 and "Traceback" not in proc.stderr.read()
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("kind", ["json", "table"])
def test_ctrl_c_in_the_middle_of_a_write_waits_for_the_whole_file(tmp_path, monkeypatch, kind):
    """A SIGINT that comes while a result file is being written: the file is finished (renamed into
    place, no temporary left) and only then does the KeyboardInterrupt come."""
    import os
    import signal

    import pyarrow as pa

    from fastsim import output

    real_replace = os.replace

    def interrupted_replace(src, dst):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C just before the rename
        time.sleep(0.01)
        real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", interrupted_replace)
    # Python's own Ctrl-C handler, as in a terminal: tests started in the background (`&`) inherit
    # SIGINT ignored, and the write then rightly lets the ignored signal pass.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            if kind == "json":
                output.write_json_atomic(tmp_path / "point.json", {"status": "ok"})
            else:
                output.write_table_atomic(pa.table({"x": [1, 2, 3]}), tmp_path / "requests", "parquet")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["point.json"] if kind == "json" else ["requests.parquet"])


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_redoing_finished_points(tmp_path):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"workload": {"num_requests": 3000, "clients": [
        {"arrival": {"process": "poisson", "rate": 4.0}, "dataset": {"name": "sharegpt"}}]},
        "simulation": {"mode": "exact"}}))
    out = tmp_path / "sw"
    # Two quick points, then one of seconds: the interrupt, sent once two are written, lands in the
    # third (one worker runs them in order), however fast the machine.
    args = [sys.executable, "-m", "fastsim.cli", "sweep", str(cfg), "--grid",
            "workload.num_requests=1000,1500,1500000", "-j", "1", "-o", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    points = out / "points"
    code = _interrupt_when(proc, lambda: points.exists() and len(list(points.glob("*.json"))) >= 2)
    done = {p.name: p.stat().st_mtime_ns for p in points.glob("*.json")}
    assert code != 0 and len(done) == 2 and not list(points.glob(".*.tmp"))
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    after = {p.name: p.stat().st_mtime_ns for p in points.glob("*.json")}
    assert len(after) == 3 and all(after[name] == mtime for name, mtime in done.items())  # not redone


def _children(pid: int) -> list[int]:
    import os

    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:  # the field after the state: the parent's id
                out.append(int(entry))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sweep_workers_end_when_the_sweep_is_killed(tmp_path):
    """kill -9 of a sweep gives it no chance to stop its pool: the workers must end by themselves."""
    import os
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "fastsim.cli", "sweep", "-q", "-j", "2", "-o", str(tmp_path / "o"),
                             "--grid", "workload.num_requests=3000000,3000001", "--set", "simulation.mode=exact"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    workers: list[int] = []
    while len(workers) < 2 and proc.poll() is None and time.monotonic() - t0 < 240:
        time.sleep(0.1)
        workers = _children(proc.pid)
    assert len(workers) == 2, proc.stderr.read() if proc.poll() is not None else "no workers"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    while any(os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z" for w in workers) \
            and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    alive = [w for w in workers if os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z"]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive
