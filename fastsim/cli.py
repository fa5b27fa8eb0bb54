"""The `fastsim` command line: a thin layer over validated config and the library."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from fastsim.errors import FastsimError
from fastsim.output import write_text_atomic

app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
                  help="fastsim: predict what an LLM-serving deployment does under a workload.")
console = Console()
err_console = Console(stderr=True)
# -q means the same everywhere: no tables or listings, only the closing line, warnings and errors.
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no tables: only the closing line, warnings and errors")]


def _version(value: bool) -> None:
    if value:
        from fastsim import __version__

        console.print(f"fastsim {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", "-V", help="print fastsim's version and exit",
                                                callback=_version, is_eager=True)] = False) -> None:
    """fastsim: predict what an LLM-serving deployment does under a workload."""


def _table(key: str, *columns: str) -> Table:
    """A listing whose first column (an id users copy) never wraps."""
    t = Table()
    t.add_column(key, no_wrap=True)
    for c in columns:
        t.add_column(c)
    return t


_SUMMARY_ROWS = [
    ("completed", "completed requests", "{:.0f}"), ("rejected", "rejected", "{:.0f}"),
    ("unfinished", "unfinished", "{:.0f}"), ("duration", "duration (s)", "{:.2f}"),
    ("total_input_tokens", "total input tokens", "{:.0f}"), ("total_output_tokens", "total generated tokens", "{:.0f}"),
    ("offered_request_rate", "offered rate (req/s)", "{:.3f}"),
    ("request_throughput", "request throughput (req/s)", "{:.3f}"),
    ("request_goodput", "request goodput (req/s)", "{:.3f}"),
    ("output_throughput", "output throughput (tok/s)", "{:.1f}"),
    ("total_token_throughput", "total token throughput (tok/s)", "{:.1f}"),
    ("mean_ttft_ms", "mean TTFT (ms)", "{:.2f}"), ("median_ttft_ms", "median TTFT (ms)", "{:.2f}"),
    ("p99_ttft_ms", "p99 TTFT (ms)", "{:.2f}"), ("mean_tpot_ms", "mean TPOT (ms)", "{:.2f}"),
    ("median_tpot_ms", "median TPOT (ms)", "{:.2f}"), ("p99_tpot_ms", "p99 TPOT (ms)", "{:.2f}"),
    ("mean_itl_ms", "mean ITL (ms)", "{:.2f}"), ("median_itl_ms", "median ITL (ms)", "{:.2f}"),
    ("p99_itl_ms", "p99 ITL (ms)", "{:.2f}"),
    ("mean_e2el_ms", "mean E2EL (ms)", "{:.2f}"), ("median_e2el_ms", "median E2EL (ms)", "{:.2f}"),
    ("p99_e2el_ms", "p99 E2EL (ms)", "{:.2f}"),
    ("preemptions", "preemptions", "{:.0f}"), ("prefix_cache_hit_rate", "prefix cache hit rate", "{:.3f}"), ("num_gpu_blocks", "KV blocks", "{:.0f}"),
    ("peak_kv_blocks_used", "peak KV blocks used", "{:.0f}"), ("iterations", "iterations", "{:.0f}"),
    ("comm_time_s", "TP communication (GPU-s)", "{:.2f}"),
    ("gpu_utilization", "GPU utilization", "{:.3f}"), ("mean_power_w", "mean power per GPU (W)", "{:.0f}"),
    ("energy_per_1k_output_tokens_j", "energy per 1K output tokens (J)", "{:.1f}"),
    ("cost_usd_per_hour", "cost ($/hour)", "{:.2f}"), ("usd_per_1m_output_tokens", "$ per 1M output tokens", "{:.3f}"),
    ("wall_time_s", "engine wall time (s)", "{:.3f}"),
]


def _cell(v, fmt: str) -> str:
    """A table cell: '-' for a missing or NaN figure."""
    return "-" if v is None or v != v else fmt.format(v)


def _goodput_caption(slo: dict) -> str:
    """Which SLO the goodput counted, in vllm bench serve's --goodput form (ttft:200 tpot:30, ms)."""
    if not slo:
        return "goodput: no slo: section, so none counted"
    return "goodput: requests meeting " + " ".join(f"{k.removesuffix('_ms')}:{v:g}" for k, v in slo.items()) + " (ms)"


def summary_table(summaries: dict[str, dict]) -> Table:
    """The figures vllm bench serve prints (same order and percentiles) and fastsim's own, one column
    per engine; a row no engine has (an offered rate of a closed loop) is left out."""
    t = Table(title="fastsim summary", caption=_goodput_caption(next(iter(summaries.values())).get("slo") or {}))
    t.add_column("metric", no_wrap=True)
    for name in summaries:
        t.add_column(name, justify="right")
    for key, label, fmt in _SUMMARY_ROWS:
        if key == "offered_request_rate" and not any(key in s for s in summaries.values()):
            continue
        t.add_row(label, *[_cell(s.get(key), fmt) for s in summaries.values()])
    return t


QUICK = "Quick flags (vllm bench serve's names)"


def quick_overrides(model, gpu, num_prompts, request_rate, max_concurrency, dataset, input_len, output_len,
                    burstiness=None, seed=None) -> list[str]:
    """The quick flags as --set overrides (values as JSON, which the YAML parser reads). A rate's
    arrivals are `vllm bench serve`'s own send times for the same --seed (schedule vllm_bench)."""
    import json
    import math

    out = [f"model={model}"] if model else []
    out += [f"hardware.gpu={gpu}"] if gpu else []
    out += [f"workload.num_requests={num_prompts}"] if num_prompts else []
    out += [f"simulation.seed={seed}"] if seed is not None else []
    if burstiness is not None and (request_rate is None or math.isinf(request_rate)):
        raise FastsimError("--burstiness shapes the gaps of a finite --request-rate; give one, or drop --burstiness")
    if all(v is None for v in (request_rate, max_concurrency, dataset, input_len, output_len)):
        return out
    if (input_len is None) != (output_len is None):
        raise FastsimError("--input-len and --output-len: give both (fixed lengths) or neither (a dataset's)")
    if dataset is not None and input_len is not None:
        raise FastsimError("--dataset and --input-len/--output-len: give one source of lengths")
    rate = math.inf if request_rate is None else request_rate
    if max_concurrency is not None and math.isfinite(rate):
        raise FastsimError("--max-concurrency with a finite --request-rate (arrivals held back by a limit in "
                           "flight) is not modelled yet; drop one of them")
    if max_concurrency is not None:
        arrival = {"process": "closed_loop", "max_concurrency": max_concurrency}
    elif math.isfinite(rate) and burstiness not in (None, 1.0):
        arrival = {"process": "gamma", "rate": rate, "burstiness": burstiness, "schedule": "vllm_bench"}
    elif math.isfinite(rate):
        arrival = {"process": "poisson", "rate": rate, "schedule": "vllm_bench"}
    else:
        arrival = {"process": "batch"}
    client = {"name": "bench", "arrival": arrival, "online": True}
    if input_len is not None:
        client |= {"prompt_tokens": {"dist": "constant", "value": input_len},
                   "output_tokens": {"dist": "constant", "value": output_len}}
    else:
        client["dataset"] = {"name": dataset or "sharegpt_vllm"}
    return out + [f"workload.clients={json.dumps([client])}"]


@app.command("run")
def run_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config; none: the built-in default scenario")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: output.dir)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a config key: engine.max_num_seqs=128")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="parquet | arrow | csv (default: output.format)")] = None,
    quiet: Quiet = False,
    model: Annotated[Optional[str], typer.Option("--model", help="model id (`fastsim models`)", rich_help_panel=QUICK)] = None,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="GPU id (`fastsim gpus`)", rich_help_panel=QUICK)] = None,
    num_prompts: Annotated[Optional[int], typer.Option("--num-prompts", min=1, help="requests in all",
                                                       rich_help_panel=QUICK)] = None,
    request_rate: Annotated[Optional[float], typer.Option("--request-rate", help="Poisson requests/s; inf: all "
                                                          "at once", rich_help_panel=QUICK)] = None,
    max_concurrency: Annotated[Optional[int], typer.Option("--max-concurrency", min=1, help="requests in flight "
                                                           "(a closed loop)", rich_help_panel=QUICK)] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="built-in dataset (sharegpt, sharegpt_vllm, ...)",
                                                   rich_help_panel=QUICK)] = None,
    input_len: Annotated[Optional[int], typer.Option("--input-len", min=1, help="every prompt this long",
                                                     rich_help_panel=QUICK)] = None,
    output_len: Annotated[Optional[int], typer.Option("--output-len", min=1, help="every answer this long",
                                                      rich_help_panel=QUICK)] = None,
    burstiness: Annotated[Optional[float], typer.Option("--burstiness", min=1e-6, help="gamma shape of the gaps "
                                                        "(1: Poisson)", rich_help_panel=QUICK)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="the run's seed (as vllm bench serve's: the "
                                                "same send times)", rich_help_panel=QUICK)] = None,
) -> None:
    """Simulate a deployment under a workload; write per-request results and summary.json.

    The quick flags take `vllm bench serve`'s names: with any of --request-rate, --max-concurrency,
    --dataset, --input-len or --output-len the workload is one client built from them (vLLM's
    ShareGPT sample unless lengths are given; all at once unless a rate or a concurrency is). A
    rate's requests leave when vllm bench serve would send them for the same --seed (default 0)."""
    from fastsim.config import load_config
    from fastsim.output import check_output_dir, write_result
    from fastsim.simulation import COMPILING, simulate

    overrides = list(set_ or []) + quick_overrides(model, gpu, num_prompts, request_rate, max_concurrency, dataset,
                                                   input_len, output_len, burstiness, seed)
    if fmt is not None:
        overrides.append(f"output.format={fmt}")
    started_at = time.time()
    cfg = load_config(config, overrides)
    out = check_output_dir(out or cfg.output.dir)
    with _progress(*_progress_columns()) as bar:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int = 0, total: int = 0) -> None:
            if stage not in tasks:
                if bar.disable and stage == COMPILING:  # minutes: a log should say why nothing happens
                    err_console.print(f"{stage} ...", highlight=False)
                for earlier in tasks.values():  # done: its elapsed time stops
                    bar.update(earlier, total=1, completed=1)
                    bar.stop_task(earlier)
                tasks[stage] = bar.add_task(stage, total=total or None)
            bar.update(tasks[stage], completed=done, total=total or None)

        result = simulate(cfg, progress=report)
        report("writing results")
        written = write_result(result, out, cfg.output.format, config=cfg, command=["fastsim"] + sys.argv[1:],
                               started_at=started_at)
    if not quiet:
        console.print(summary_table(result.summaries))
    for note in result.warnings:
        _warn(note)
    stalled = {name: s["stalled_requests"] for name, s in result.summaries.items() if s.get("stalled_requests")}
    for name, count in stalled.items():
        _warn(f"{name}: {count} requests never finished although no time limit was set: the engine could not "
              "make progress for them (please report the config)")
    _warn_uncalibrated(cfg)
    stopped = [name for name, s in result.summaries.items() if s.get("stopped_by_wall_time_budget")]
    if stopped:
        _warn(f"simulation.max_wall_time_s ran out ({', '.join(stopped)}): requests not done are marked unfinished")
    console.print(f"wrote {', '.join(str(p) for p in written)}")


def _warn(text: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {text}", highlight=False)


@app.command("warmup")
def warmup_cmd(quiet: Quiet = False) -> None:
    """Compile the simulation kernels now (a few minutes, once per fastsim version), so that the
    first `fastsim run` starts at once; removes the compiled kernels of other versions."""
    import os

    from fastsim.engine import kernels_compiled, prune_stale_caches
    from fastsim.simulation import COMPILING, warm_up

    was = kernels_compiled()
    with _progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as bar:
        bar.add_task("loading simulation kernels" if was else COMPILING, total=None)
        seconds = warm_up()
    removed = prune_stale_caches()
    freed = f"; removed {len(removed)} cache(s) of other versions" if removed else ""
    console.print(f"simulation kernels {'were already' if was else 'are now'} compiled ({seconds:.1f} s){freed}")
    if not quiet:
        console.print(f"cache: {os.environ['NUMBA_CACHE_DIR']}", highlight=False, soft_wrap=True)


def _warn_uncalibrated(cfg) -> None:
    """A warning for each GPU of the run whose figures fastsim cannot vouch for (no profile given)."""
    from fastsim.catalog import load_gpu
    from fastsim.catalog.gpus import load_gpu_file
    from fastsim.cost.profile import profile_warning

    if cfg.hardware.profile is not None:
        return
    custom = load_gpu_file(cfg.hardware.gpus_file) if cfg.hardware.gpus_file else None
    names = {cfg.hardware.gpu} | {p.gpu for p in (cfg.cluster.pools or []) if p.gpu}
    for name in sorted(names):
        why = profile_warning(load_gpu(name, custom))
        if why:
            _warn(why)


def _progress(*columns, **kw) -> Progress:
    """Progress on stderr, gone when done; none when stderr is not a terminal (a log or a pipe
    would keep only the blank line a finished bar leaves)."""
    return Progress(*columns, console=err_console, disable=not err_console.is_terminal, transient=True, **kw)


def _progress_columns():
    return (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())


def _default_jobs() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Two-line headers: a sweep's table fits 80 columns with two swept keys.
_SWEEP_COLUMNS = [("request_throughput", "req/s", "{:.3f}"), ("output_throughput", "out\ntok/s", "{:.0f}"),
                  ("p99_ttft_ms", "p99 TTFT\n(ms)", "{:.1f}"), ("p99_tpot_ms", "p99 TPOT\n(ms)", "{:.2f}"),
                  ("request_goodput", "goodput\n(req/s)", "{:.3f}")]


@app.command("sweep")
def sweep_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config (its `sweep:` section, if any, says what "
                                                            "to vary); none: the built-in default")] = None,
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="vary a key over every combination: "
                    "key=v1,v2,... or key=start:stop:step (stop included)")] = None,
    zip_: Annotated[Optional[list[str]], typer.Option("--zip", help="vary keys together, i-th value with i-th "
                    "value: key=v1,v2,...")] = None,
    random: Annotated[Optional[int], typer.Option("--random", help="draw this many points from the parameters' "
                      "values instead of taking all", min=1)] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of --random's draws")] = 0,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a base config key")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: output.dir)")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="parallel workers (default: every core)",
                    min=1)] = None,
    executor: Annotated[str, typer.Option("--executor", help="local (processes on this machine) or ray")] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (default: start a "
                       "local Ray instance)")] = None,
    save_requests: Annotated[bool, typer.Option("--save-requests", help="also write each point's per-request "
                             "table: <out>/requests/point_id=<id>/ (a Parquet dataset)")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="run again the points that failed "
                            "before (done points are always skipped)")] = False,
    quiet: Quiet = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="run a sweep of more than 10,000 points")] = False,
) -> None:
    """Run many variations of a config in parallel; one summary row per point and engine in
    <out>/sweep.parquet. Re-running skips the points already done."""
    from fastsim.config import Sweep, build_config, deep_merge, parse_overrides, read_config_file
    from fastsim.output import check_output_dir
    from fastsim.sweep import (MAX_POINTS_UNASKED, check_values, parameter_sizes, parse_cli_parameter, point_count,
                               run_sweep, sweep_points)

    if executor not in ("local", "ray"):
        raise FastsimError(f"--executor {executor!r}: expected local or ray")
    if grid and zip_:
        raise FastsimError("--grid and --zip cannot be mixed: give every parameter with one of them")
    raw = deep_merge(read_config_file(config), parse_overrides(list(set_ or [])))
    cfg = build_config(raw)
    if grid or zip_:
        params = dict(parse_cli_parameter(item, "--zip" if zip_ else "--grid") for item in (grid or zip_))
        mode = "random" if random else ("zip" if zip_ else "grid")
        spec = _sweep_spec(Sweep, {"mode": mode, "parameters": params, "samples": random, "seed": seed})
    elif cfg.sweep is not None:
        spec = cfg.sweep if not random else _sweep_spec(Sweep, {**cfg.sweep.model_dump(), "mode": "random",
                                                                "samples": random, "seed": seed})
    else:
        raise FastsimError("sweep: nothing to vary; give --grid key=v1,v2 (or --zip) or a `sweep:` section "
                           "in the config")
    count = point_count(spec)
    if count > MAX_POINTS_UNASKED and not yes:
        sizes = " x ".join(f"{n:,}" for n in parameter_sizes(spec))
        raise FastsimError(f"sweep: {count:,} points ({spec.mode} of {sizes}) is more than {MAX_POINTS_UNASKED:,}; "
                           "give --yes to run them all, or --random N to draw N of them")
    check_values(spec, raw)
    points = sweep_points(spec, raw)
    out_dir = check_output_dir(out or cfg.output.dir)
    n_jobs = jobs or _default_jobs()
    if not quiet:
        err_console.print(f"sweep: {len(points):,} points on {n_jobs} worker(s)", highlight=False)
    # No refresh thread while worker processes are forked (Linux): the bar redraws on each update.
    with _progress(*_progress_columns(), auto_refresh=False) as bar:
        task = bar.add_task(f"sweep of {len(points)} points", total=len(points))

        def report(done: int, total: int, failed: int) -> None:
            bar.update(task, completed=done, description=f"sweep of {total} points"
                       + (f", {failed} failed" if failed else ""))
            bar.refresh()

        outcome = run_sweep(raw, points, out_dir, executor=executor, jobs=n_jobs, address=address,
                            save_requests=save_requests, retry_failed=retry_failed, progress=report)
    import pyarrow.parquet as pq

    rows = pq.read_table(outcome.table_path).to_pylist()
    if not quiet:
        console.print(_sweep_table(rows, list(spec.parameters)))
    for line in _sweep_failures(rows, list(spec.parameters)):
        err_console.print(f"[red]failed[/] {line}", highlight=False, soft_wrap=True)
    console.print(f"{outcome.total} points: {outcome.ran} run, {outcome.skipped} already done, "
                  f"{outcome.failed} failed; wrote {outcome.table_path}")


def _sweep_spec(model, data: dict):
    from pydantic import ValidationError

    from fastsim.config import format_validation_error

    try:
        return model(**data)
    except ValidationError as e:
        raise FastsimError(format_validation_error(e, prefix="sweep", label="")) from None


def _sweep_table(rows: list[dict], keys: list[str], limit: int = 40) -> Table:
    """The swept values (never cut to '…'), the engine if there are several, the headline figures,
    and the status if any point failed."""
    t = Table(title=f"sweep ({len(rows)} rows{'; first ' + str(limit) if len(rows) > limit else ''})")
    short = [k.rsplit(".", 1)[-1] for k in keys]  # the full keys are the table's column names
    for k, name in zip(keys, short):
        t.add_column(name if short.count(name) == 1 else k, no_wrap=True)
    engines = len({row.get("engine") for row in rows}) > 1
    failed = any(row["status"] != "ok" for row in rows)
    if engines:
        t.add_column("engine", no_wrap=True)
    for _, label, _ in _SWEEP_COLUMNS:
        t.add_column(label, justify="right")
    if failed:
        t.add_column("status")
    for row in rows[:limit]:
        cells = [str(row.get(k)) for k in keys] + ([str(row.get("engine") or "-")] if engines else [])
        cells += [_cell(row.get(key), fmt) for key, _, fmt in _SWEEP_COLUMNS]
        t.add_row(*cells, *([row["status"]] if failed else []))
    return t


def _sweep_failures(rows: list[dict], keys: list[str], limit: int = 5) -> list[str]:
    rows = [r for r in rows if r["status"] != "ok"]
    lines = [f"point {r['point']} ({', '.join(f'{k}={r[k]}' for k in keys)}): {r['error']}" for r in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more (the `error` column of the table)")
    return lines


@app.command("capacity")
def capacity_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config; none: the built-in default")] = None,
    slo: Annotated[Optional[list[str]], typer.Option("--slo", help="metric:stat=limit_ms, e.g. ttft_ms:p99=500 "
                   "(metrics ttft_ms, tpot_ms, itl_ms, e2el_ms; stats mean, median, p90, p95, p99)")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="stop when the bracket is this close "
                         "(relative)", min=1e-4, max=0.5)] = 0.01,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a config key")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder for capacity.json "
                   "(default: output.dir)")] = None,
    quiet: Quiet = False,
) -> None:
    """The highest request rate that meets every SLO, per engine (bisection on the rate, same seed)."""
    from fastsim.capacity import engine_configs, find_capacity, parse_slo
    from fastsim.config import build_config, deep_merge, parse_overrides, read_config_file
    from fastsim.output import check_output_dir, write_json_atomic

    raw = deep_merge(read_config_file(config), parse_overrides(list(set_ or [])))
    cfg = build_config(raw)
    targets = [parse_slo(s) for s in (slo or [])]
    out = check_output_dir(out or cfg.output.dir)
    results = []
    with _progress(SpinnerColumn(), TextColumn("{task.description}")) as bar:
        for name, eng_raw in engine_configs(raw):
            task = bar.add_task(f"{name}: searching")

            def report(p, task=task, name=name) -> None:
                bar.update(task, description=f"{name}: {p.rate:.4g} req/s "
                           + ("meets the SLOs" if p.meets else f"misses ({p.why})"))

            results.append(find_capacity(eng_raw, name, targets, tolerance=tolerance, report=report))
    t = Table(title="capacity: " + ", ".join(str(s) for s in targets))
    for col in ("engine", "req/s", "out tok/s", *(s.key for s in targets), "runs"):
        t.add_column(col, justify="left" if col == "engine" else "right", no_wrap=True)
    for c in results:
        if c.rate is None:
            t.add_row(c.engine, "none", "-", *("-" for _ in targets), str(len(c.probes)))
            continue
        t.add_row(c.engine, f"{c.rate:.3f}", f"{c.at_rate['output_throughput']:.0f}",
                  *(f"{c.at_rate[s.key]:.2f}" for s in targets), str(len(c.probes)))
    if not quiet:
        console.print(t)
    for c in results:
        if c.rate is None:
            lowest = min(c.probes, key=lambda p: p.rate)
            err_console.print(f"{c.engine}: misses the SLOs even at {lowest.rate:.3g} req/s ({lowest.why})")
    path = out / "capacity.json"
    write_json_atomic(path, {"slos": [str(s) for s in targets], "tolerance": tolerance, "engines": [
        {"engine": c.engine, "max_request_rate": c.rate, "summary_at_max_rate": c.at_rate,
         "probes": [{"request_rate": p.rate, "meets": p.meets, "why_not": p.why or None,
                     **{s.key: p.summary.get(s.key) for s in targets}} for p in c.probes]} for c in results]})
    console.print(f"wrote {path}")


def _int_list(value: str, option: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise FastsimError(f"{option} {value!r}: expected positive integers separated by commas, e.g. 1,2,4")
    return out


@app.command("search")
def search_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config (one engine): model, workload, engine "
                                                            "defaults; none: the built-in default")] = None,
    rate: Annotated[Optional[float], typer.Option("--rate", help="target request rate, req/s (default: the "
                    "config's)", min=1e-9)] = None,
    slo: Annotated[Optional[list[str]], typer.Option("--slo", help="metric:stat=limit_ms, e.g. ttft_ms:p99=500")] = None,
    gpu: Annotated[Optional[list[str]], typer.Option("--gpu", help="GPU ids to consider (default: every "
                   "catalog GPU with a price)")] = None,
    tp: Annotated[str, typer.Option("--tp", help="tensor_parallel_size values")] = "1,2,4,8",
    pp: Annotated[str, typer.Option("--pp", help="pipeline_parallel_size values")] = "1",
    max_num_seqs: Annotated[Optional[str], typer.Option("--max-num-seqs", help="values (default: the config's)")] = None,
    max_num_batched_tokens: Annotated[Optional[str], typer.Option("--max-num-batched-tokens",
                                      help="values (default: the config's)")] = None,
    max_replicas: Annotated[int, typer.Option("--max-replicas", help="most data-parallel replicas tried", min=1)] = 16,
    latency: Annotated[Optional[str], typer.Option("--latency", help="the Pareto frontier's latency metric "
                       "(default: the first SLO's, e.g. p99_ttft_ms)")] = None,
    objective: Annotated[str, typer.Option("--objective", help="what to minimise: cost_usd_per_hour, "
                         "usd_per_1m_output_tokens, energy_per_1k_output_tokens_j, num_gpus, mean_power_w")
                         ] = "cost_usd_per_hour",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a config key")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: output.dir)")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="parallel workers (default: every core)",
                    min=1)] = None,
    executor: Annotated[str, typer.Option("--executor", help="local or ray")] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster address")] = None,
    quiet: Quiet = False,
) -> None:
    """The cheapest (or, with --objective, most energy-efficient ...) deployment (GPU, TP, PP, replicas, engine limits) that serves a request rate
    within the SLOs, and the cost/latency Pareto frontier. Writes <out>/search.parquet."""
    from fastsim.capacity import parse_slo
    from fastsim.config import build_config, deep_merge, parse_overrides, read_config_file
    from fastsim.output import check_output_dir
    from fastsim.search import SearchSpace, run_search

    raw = deep_merge(read_config_file(config), parse_overrides(list(set_ or [])))
    cfg = build_config(raw)
    targets = [parse_slo(s) for s in (slo or [])]
    out_dir = check_output_dir(out or cfg.output.dir)
    space = SearchSpace(
        gpus=list(gpu or []), tensor_parallel_size=_int_list(tp, "--tp"), pipeline_parallel_size=_int_list(pp, "--pp"),
        max_num_seqs=_int_list(max_num_seqs, "--max-num-seqs") if max_num_seqs else [cfg.engine.max_num_seqs],
        max_num_batched_tokens=(_int_list(max_num_batched_tokens, "--max-num-batched-tokens")
                                if max_num_batched_tokens else [cfg.engine.max_num_batched_tokens]),
        max_replicas=max_replicas)
    # No refresh thread while worker processes are forked (Linux): the bar redraws on each update.
    with _progress(*_progress_columns(), auto_refresh=False) as bar:
        task = bar.add_task("deployments", total=None)

        def report(done: int, total: int, pruned: int) -> None:
            bar.update(task, completed=done, total=total, description=f"{total} deployments ({pruned} pruned: "
                       "do not fit)")
            bar.refresh()

        res = run_search(raw, rate, targets, space, out_dir, latency=latency,
                         objective=objective, executor=executor, jobs=jobs or _default_jobs(), address=address, progress=report)
    lat = res.latency
    t = Table(title=f"Pareto frontier at {res.request_rate:g} req/s: " + ", ".join(str(s) for s in targets))
    extra = [objective] if objective not in ("cost_usd_per_hour", "num_gpus") else []
    for col in ("GPU", "TP", "PP", "DP", "seqs", "tokens", "GPUs", "$/h", *extra, lat):
        t.add_column(col, justify="left" if col == "GPU" else "right", no_wrap=True)
    for r in res.frontier:
        t.add_row(r["gpu"], str(r["tensor_parallel_size"]), str(r["pipeline_parallel_size"]),
                  str(r["data_parallel_size"]), str(r["max_num_seqs"]), str(r["max_num_batched_tokens"]),
                  str(r["num_gpus"]), f"{r['cost_usd_per_hour']:.2f}", *(f"{r[k]:.3g}" for k in extra), f"{r[lat]:.1f}")
    if not quiet:
        console.print(t)
    if res.frontier:
        c = res.frontier[0]
        console.print(f"best by {objective}: {c['data_parallel_size']} x {c['gpu']} replicas at TP "
                      f"{c['tensor_parallel_size']}, PP {c['pipeline_parallel_size']} = "
                      f"${c['cost_usd_per_hour']:.2f}/hour" + (f", {objective} {c[objective]:.3g}" if extra else ""))
    else:
        err_console.print(f"no deployment of {res.deployments} tried (up to {max_replicas} replicas) meets the SLOs")
    console.print(f"{len(res.rows)} simulations of {res.deployments} deployments, {len(res.pruned)} pruned; "
                  f"wrote {res.table_path}")


@app.command("plot")
def plot_cmd(
    results: Annotated[Path, typer.Argument(help="a folder written by fastsim run or fastsim sweep")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="where to write (default: RESULTS/plots)")] = None,
    x: Annotated[Optional[str], typer.Option("--x", help="sweep: the swept key on the x axis (default: the "
                 "arrival rate)")] = None,
    quiet: Quiet = False,
) -> None:
    """Figures (PNG and SVG): latency CDFs per engine, KV use and queues over time (with
    output.timeline), throughput and latency against the swept rate."""
    from fastsim.plots import plot_results

    written = plot_results(results, out, x)
    console.print("wrote " + ", ".join(str(p) for p in written))


@app.command("validate")
def validate_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config to check; none: the built-in default")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a config key")] = None,
    quiet: Quiet = False,
) -> None:
    """Check a config without simulating; show each engine's memory plan."""
    import numpy as np

    from fastsim.config import load_config
    from fastsim.planning import check_memory, check_requests, plan_engines
    from fastsim.workload import generate_workload

    from fastsim.cost.serving import engine_serving
    from fastsim.frameworks import FRAMEWORKS
    from fastsim.memory import expert_parallel_size, kv_dtype

    cfg = load_config(config, list(set_ or []))
    model, gpu, plans = plan_engines(cfg)
    columns = [(f"{eng.name}" + (f" / {rp.pool}" if len(pools) > 1 else ""), rp) for eng, pools in plans
               for rp in pools]
    t = Table(title=f"{model.name}: memory per GPU")
    t.add_column("", no_wrap=True)
    for name, _ in columns:
        t.add_column(name, justify="right")
    gib = 2**30
    rows = [("GPU", lambda rp: rp.gpu.name),
            ("replicas x (TP x PP)", lambda rp: f"{rp.count} x ({rp.engine.tensor_parallel_size} x "
                                                 f"{rp.engine.pipeline_parallel_size})"),
            ("GPU memory, as CUDA reports it (GiB)", lambda rp: rp.memory.gpu_total_bytes / gib),
            # TensorRT-LLM sizes the KV cache by kv_cache_free_gpu_mem_fraction of what is left instead.
            ("budget at gpu_memory_utilization (GiB)",
             lambda rp: "-" if FRAMEWORKS[rp.engine.framework].trtllm_memory else rp.memory.budget_bytes / gib),
            ("weights (GiB)", lambda rp: rp.memory.weight_bytes / gib),
            ("activation peak of the profiling run (GiB)", lambda rp: rp.memory.activation_bytes / gib),
            ("non-torch: CUDA workspaces, NCCL buffers (GiB)", lambda rp: rp.memory.non_torch_bytes / gib),
            ("KV cache (GiB)", lambda rp: rp.memory.kv_cache_bytes / gib),
            ("KV per token (KiB)", lambda rp: rp.memory.kv_bytes_per_token / 1024),
            ("KV blocks", lambda rp: rp.memory.num_gpu_blocks), ("KV tokens", lambda rp: rp.memory.kv_tokens),
            ("max_model_len", lambda rp: rp.memory.max_model_len),
            ("weights dtype / KV dtype", lambda rp: f"{rp.engine.dtype} / {kv_dtype(rp.engine)}"),
            ("CPU per iteration: ms + us/seq + us/token",
             lambda rp: (lambda s: f"{s.overhead_ms:g} + {s.per_seq_us:g} + {s.per_token_us:g}")(engine_serving(rp.engine))),
            ("API server latency, online (ms)", lambda rp: engine_serving(rp.engine).api_server_latency_ms),
            ("async scheduling (CPU beside the GPU)", lambda rp: "on" if rp.engine.async_scheduling else "off")]
    if model.is_moe:
        def experts(rp) -> str:
            ep, tp = expert_parallel_size(model, rp.engine), rp.engine.tensor_parallel_size
            if ep > 1:
                return f"{model.num_local_experts // ep} whole (EP {ep})"
            return f"{model.num_local_experts}" + (f", 1/{tp} of each (TP)" if tp > 1 else "")
        rows.append(("routed experts per GPU", experts))
    if any(rp.engine.speculative_config for _, rp in columns):
        rows.append(("speculation: tokens per step", lambda rp: "-" if rp.engine.speculative_config is None else
                     f"{rp.engine.speculative_config.expected_tokens_per_step:.2f} of "
                     f"{rp.engine.speculative_config.num_speculative_tokens + 1} "
                     f"({rp.engine.speculative_config.draft_method})"))

    def cell(v) -> str:
        return f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    for label, f in rows:
        t.add_row(label, *[cell(f(rp)) for _, rp in columns])
    if not quiet:
        console.print(t)
    # What run checks before it simulates: the memory the arrays need, then the workload itself
    # (traces read and parsed, lengths drawn), and which requests no replica could serve.
    check_memory(cfg, len(plans))
    workload = generate_workload(cfg.workload, cfg.simulation.seed)
    span = float(np.nanmax(workload.arrival_s) - np.nanmin(workload.arrival_s))  # NaN: later turns
    pace = f"{(len(workload) - 1) / span:,.3g} req/s offered" if span > 0 else "all at once"
    if not quiet:
        console.print(f"workload: {len(workload):,} requests from {len(cfg.workload.clients)} client(s), {pace}, "
                      f"mean prompt {workload.prompt_tokens.mean():,.0f} / output "
                      f"{workload.output_tokens.mean():,.0f} tokens", highlight=False)
    for note in check_requests(plans, workload)[1]:
        _warn(note)
    _warn_uncalibrated(cfg)
    console.print(f"{config or 'the built-in default'}{' with ' + ', '.join(set_) if set_ else ''}: valid")


@app.command("generate-config")
def generate_config_cmd(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="write here instead of stdout")] = None,
    quiet: Quiet = False,
) -> None:
    """Print a commented YAML config with every option and its default."""
    from fastsim.config_template import config_template

    _print_or_write(config_template(), out, quiet)


def _print_or_write(text: str, out: Path | None, quiet: bool = False) -> None:
    if out is None:
        sys.stdout.write(text)
    else:
        write_text_atomic(out, text)
        if not quiet:
            console.print(f"wrote {out}")


@app.command("config-reference")
def config_reference_cmd(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="write here instead of stdout")] = None,
    quiet: Quiet = False,
) -> None:
    """Print the configuration reference (Markdown): every key, its type, default and meaning."""
    from fastsim.config_reference import config_reference

    _print_or_write(config_reference(), out, quiet)


@app.command("models")
def models_cmd(quiet: Annotated[bool, typer.Option("--quiet", "-q", help="only the ids, one per line")] = False) -> None:
    """List the built-in models (any local config.json path works too)."""
    from fastsim.catalog import load_model, model_ids

    if quiet:
        console.print("\n".join(model_ids()), highlight=False)
        return

    t = _table("id", "params (B)", "active (B)", "layers", "hidden", "attention", "experts", "KV KiB/token (bf16)",
               "max context")
    for mid in model_ids():
        m = load_model(mid)
        attention = (f"MLA {m.num_attention_heads} heads" if m.is_mla
                     else f"{m.num_attention_heads} / {m.num_key_value_heads} kv")
        experts = (f"{m.num_local_experts} top-{m.num_experts_per_tok}"
                   + (" +shared" if m.shared_expert_intermediate_size else "") if m.is_moe else "-")
        t.add_row(mid, f"{m.num_params / 1e9:.2f}", f"{m.num_active_params / 1e9:.2f}", str(m.num_hidden_layers),
                  str(m.hidden_size), attention, experts, f"{m.kv_bytes_per_token('bf16') / 1024:.1f}",
                  str(m.max_position_embeddings))
    console.print(t)


@app.command("gpus")
def gpus_cmd(quiet: Annotated[bool, typer.Option("--quiet", "-q", help="only the ids, one per line")] = False) -> None:
    """List the built-in GPUs with their datasheet figures."""
    from fastsim.catalog.gpus import builtin_gpus

    if quiet:
        console.print("\n".join(builtin_gpus()), highlight=False)
        return

    from fastsim.cost.profile import profile_origin

    t = _table("id", "memory GiB", "bandwidth GB/s", "bf16 TFLOP/s", "fp8 TFLOP/s", "link", "TDP W", "$/hour",
               "rates")
    for g in builtin_gpus().values():
        t.add_row(g.name, f"{g.memory_gib:g}", f"{g.mem_bw_gb_s:g}", f"{g.bf16_tflops:g}",
                  f"{g.fp8_tflops:g}" if g.fp8_tflops else "-", f"{g.interconnect} {g.link_gb_s:g} GB/s",
                  f"{g.tdp_w:g}" if g.tdp_w else "-",
                  f"{g.price_usd_per_hour:.2f}" if g.price_usd_per_hour else "-",
                  profile_origin(g))
    console.print(t)


@app.command("calibrate")
def calibrate_cmd(
    measurements: Annotated[Path, typer.Argument(help="step-times CSV in the format of measure_steps.py")],
    gpu: Annotated[str, typer.Option("--gpu", help="GPU catalog id the measurements were taken on")],
    out: Annotated[Path, typer.Option("-o", "--out", help="where to write the fitted profile (YAML)")] = Path("profile.yaml"),
    quiet: Quiet = False,
) -> None:
    """Fit a cost profile from measured GEMM/copy micro-benchmarks (and layer rows, if any)."""
    from fastsim.catalog import load_gpu
    from fastsim.cost.accuracy import error_table
    from fastsim.cost.calibrate import fit_profile, read_measurements

    spec = load_gpu(gpu)
    meas = read_measurements(measurements)
    prof = fit_profile(meas, spec)
    write_text_atomic(out, prof.to_yaml())
    console.print(f"fitted on {len(meas.gemm)} GEMM rows and {len(meas.layers)} layer rows -> {out}")
    if meas.layers and not quiet:
        console.print(error_table(prof, spec, meas.layers))


def main() -> None:
    try:
        code = app(standalone_mode=False)
        # Typer turns Ctrl-C into a returned exit code (130) when not in standalone mode.
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except FastsimError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted (no output file is left half-written)")
        sys.exit(130)
    except MemoryError:
        err_console.print("[bold red]error:[/] out of memory; lower workload.num_requests (or duration_s) or run "
                          "fewer engines at once", highlight=False)
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # Usage errors (bad option, missing argument) come from Typer's click layer with their own
        # message and exit code; anything else is a bug and keeps its traceback.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
