"""`fastsim sweep`: many variations of one config, run in parallel. Each point's result is saved the
moment it finishes (one small JSON file, written atomically), so an interrupted or partly failed
sweep loses nothing and a re-run skips the points already done; the summary table is assembled
from those files at the end."""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from fastsim.config import (Config, Sweep, SweepDistribution, SweepRange, build_config, deep_merge,
                            format_validation_error, set_path)
from fastsim.errors import FastsimError
from fastsim.executors import run_tasks
from fastsim.output import simulated_only

POINTS_DIR = "points"
REQUESTS_DIR = "requests"
TABLE_NAME = "sweep"


@dataclass(frozen=True)
class Point:
    index: int
    params: dict[str, Any]  # dotted config key -> value
    point_id: str           # stable across runs: a hash of the base config and params


# -- which points ----------------------------------------------------------------------------------
def range_size(r: SweepRange) -> int:
    return int(math.floor((r.stop - r.start) / r.step + 1e-9)) + 1


def range_value(r: SweepRange, i: int):
    """The i-th value of a range: an integer if start, stop and step all are."""
    v = r.start + i * r.step
    if all(float(x).is_integer() for x in (r.start, r.stop, r.step)):
        return int(round(v))
    return round(v, 12)


def range_values(r: SweepRange) -> list:
    """start, start + step, ... up to stop inclusive (to rounding)."""
    return [range_value(r, i) for i in range(range_size(r))]


def parameter_values(spec) -> list:
    return range_values(spec) if isinstance(spec, SweepRange) else list(spec)


def sweep_points(sweep: Sweep, base_raw: dict) -> list[Point]:
    keys = list(sweep.parameters)
    if sweep.mode == "grid":
        combos = itertools.product(*(parameter_values(sweep.parameters[k]) for k in keys))
    elif sweep.mode == "zip":
        columns = [parameter_values(sweep.parameters[k]) for k in keys]
        lengths = {k: len(c) for k, c in zip(keys, columns)}
        if len(set(lengths.values())) > 1:
            raise FastsimError(f"sweep: zip mode needs as many values for every parameter, got {lengths}")
        combos = zip(*columns)
    else:
        rng = np.random.default_rng(sweep.seed)
        combos = ([_draw(sweep.parameters[k], rng) for k in keys] for _ in range(sweep.samples))
    # What a point simulates, not the sweep section or where results go: extending a sweep or
    # writing elsewhere keeps the ids of the points already done.
    base_hash = _digest({k: v for k, v in base_raw.items() if k not in ("sweep", "output")})
    points = []
    for i, values in enumerate(combos):
        params = dict(zip(keys, values))
        points.append(Point(i, params, _digest([base_hash, params])[:16]))
    return points


def _draw(spec, rng: np.random.Generator):
    if isinstance(spec, SweepDistribution):
        if spec.log:
            v = float(np.exp(rng.uniform(np.log(spec.low), np.log(spec.high))))
        else:
            v = float(rng.uniform(spec.low, spec.high))
        return int(round(v)) if spec.integer else v
    values = parameter_values(spec)
    return values[int(rng.integers(len(values)))]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def parse_cli_parameter(item: str, option: str) -> tuple[str, list | SweepRange]:
    """`key=v1,v2,...` (each value read as YAML) or `key=start:stop:step` (stop included)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise FastsimError(f"{option} {item!r}: expected key=v1,v2 or key=start:stop:step, "
                           "e.g. engine.max_num_seqs=64,128,256")
    parts = raw.split(":")
    if len(parts) == 3:
        try:
            start, stop, step = (float(p) for p in parts)
        except ValueError:
            pass
        else:
            try:
                return key, SweepRange(start=start, stop=stop, step=step)
            except ValidationError as e:
                raise FastsimError(f"{option} {item!r}: "
                                   f"{format_validation_error(e, label='')}") from None
    values = []
    for v in raw.split(","):
        try:
            values.append(yaml.safe_load(v))
        except yaml.YAMLError:
            values.append(v)
    return key, values


def point_config(base_raw: dict, params: dict) -> Config:
    return build_config(_point_raw(base_raw, params))


def _point_raw(base_raw: dict, params: dict) -> dict:
    over: dict = {}
    for key, value in params.items():
        set_path(over, key, value, f"sweep parameter {key!r}")
    return deep_merge(copy.deepcopy({k: v for k, v in base_raw.items() if k != "sweep"}), over)


# A sweep this large is more likely a typo (1:100000:1) than a plan: it runs only when asked twice.
MAX_POINTS_UNASKED = 10_000


def parameter_sizes(sweep: Sweep) -> list[int]:
    """How many values each listed or ranged parameter takes (a range not made into a list)."""
    return [range_size(v) if isinstance(v, SweepRange) else len(v) for v in sweep.parameters.values()
            if not isinstance(v, SweepDistribution)]


def point_count(sweep: Sweep) -> int:
    """How many points a sweep has, counted without making them."""
    sizes = parameter_sizes(sweep)
    if sweep.mode == "random":
        return sweep.samples
    if sweep.mode == "zip":
        return max(sizes, default=0)
    return math.prod(sizes)


def _is_about(loc: tuple, key: str) -> bool:
    """Whether a validation error's location is the key itself: its parts in order, the union
    tags pydantic inserts (`poisson` in workload.clients.0.arrival.poisson.rate) aside."""
    parts, i = key.split("."), 0
    for step in map(str, loc):
        if i < len(parts) and step == parts[i]:
            i += 1
    return i == len(parts) and str(loc[-1]) == parts[-1]


def check_values(sweep: Sweep, base_raw: dict) -> None:
    """A value wrong on its own (a word where a number goes, outside its field's range) would fail
    every point that has it: refused before any point runs. Values that are wrong only together
    with others fail their points. A range is checked at its ends, a list at every value."""
    for key, spec in sweep.parameters.items():
        if isinstance(spec, SweepDistribution):
            continue
        ends = [range_value(spec, 0), range_value(spec, range_size(spec) - 1)] if isinstance(spec, SweepRange) else None
        seen = set()
        for v in ends if ends is not None else parameter_values(spec):
            marker = json.dumps(v, sort_keys=True, default=str)
            if marker in seen:
                continue
            seen.add(marker)
            try:
                Config(**_point_raw(base_raw, {key: v}))
            except ValidationError as e:
                if any(err["type"] == "extra_forbidden" for err in e.errors()):  # a misspelt key, as check_keys says
                    raise FastsimError(format_validation_error(e, label="sweep parameter: ")) from None
                own = [err for err in e.errors() if err["loc"] and _is_about(err["loc"], key)]
                if own:
                    raise FastsimError(f"sweep parameter {key} = {v!r}: {own[0]['msg']}; every point with this "
                                       "value would fail: fix or drop it") from None


def check_keys(base_raw: dict, point: Point) -> None:
    """A misspelt key would fail every point: say so once, before running any. (A bad value fails
    its point only; a list index past the end fails in _point_raw, for every point.)"""
    try:
        Config(**_point_raw(base_raw, point.params))
    except ValidationError as e:
        if any(err["type"] == "extra_forbidden" for err in e.errors()):
            raise FastsimError(format_validation_error(e, label="sweep parameter: ")) from None


# -- one point, in a worker --------------------------------------------------------------------------
def flat_summary(summary: dict) -> dict:
    """The scalar metrics of one engine's summary, SLO limits as slo_<name>; per-replica detail and
    wall-clock readings left out."""
    out = {}
    for k, v in simulated_only(summary).items():
        if isinstance(v, list):
            continue
        if isinstance(v, dict):
            out.update({f"{k}_{kk}": vv for kk, vv in v.items() if not isinstance(vv, (dict, list))})
        else:
            out[k] = v
    return out


def run_point(base_raw: dict, params: dict, requests_path: str | None) -> dict:
    """Simulate one point; never raises (a failure is part of the result)."""
    from fastsim.output import write_table_atomic
    from fastsim.simulation import simulate

    t0 = time.perf_counter()
    try:
        result = simulate(point_config(base_raw, params))
        if requests_path is not None:
            write_table_atomic(result.requests, requests_path, "parquet")
        summaries = {name: flat_summary(s) for name, s in result.summaries.items()}
        return {"status": "ok", "error": None, "summaries": summaries, "wall_s": time.perf_counter() - t0}
    except FastsimError as e:
        error = str(e)
    except Exception as e:  # a bug; recorded so the other points go on
        error = f"{type(e).__name__}: {e}"
    return {"status": "failed", "error": error, "summaries": {}, "wall_s": time.perf_counter() - t0}


# -- the sweep -------------------------------------------------------------------------------------
@dataclass
class SweepOutcome:
    table_path: Path
    total: int
    ran: int
    skipped: int
    failed: int


def run_sweep(base_raw: dict, points: list[Point], out_dir: Path, *, executor: str = "local", jobs: int = 1,
              address: str | None = None, save_requests: bool = False, retry_failed: bool = False,
              progress: Callable[[int, int, int], None] | None = None) -> SweepOutcome:
    """Run the points not yet done in out_dir, record each, write <out_dir>/sweep.parquet.
    progress(done, total, failed) is called as points finish."""
    from fastsim.output import write_json_atomic

    if not points:
        raise FastsimError("sweep: no points to run")
    check_keys(base_raw, points[0])
    points_dir = out_dir / POINTS_DIR
    done: dict[str, dict] = {}
    for p in points:
        rec = _read_point(points_dir / f"{p.point_id}.json")
        if rec is not None and (rec["status"] == "ok" or not retry_failed):
            done[p.point_id] = rec
    todo = [p for p in points if p.point_id not in done]
    skipped = len(points) - len(todo)
    tasks = [(p.index, base_raw, p.params,
              str(out_dir / REQUESTS_DIR / f"point_id={p.point_id}" / "part-0.parquet") if save_requests else None)
             for p in todo]
    by_index = {p.index: p for p in todo}
    failed = sum(1 for r in done.values() if r["status"] != "ok")
    if progress:
        progress(skipped, len(points), failed)
    if tasks:
        for n, (index, res, crash) in enumerate(run_tasks(run_point, tasks, executor, jobs, address), start=1):
            p = by_index[index]
            if crash is not None:
                res = {"status": "failed", "error": crash, "summaries": {}, "wall_s": 0.0}
            rec = {"point_id": p.point_id, "params": p.params, **res}
            write_json_atomic(points_dir / f"{p.point_id}.json", rec)
            done[p.point_id] = rec
            failed += res["status"] != "ok"
            if progress:
                progress(skipped + n, len(points), failed)
    path = write_sweep_table(points, done, out_dir)
    return SweepOutcome(path, len(points), len(todo), skipped, failed)


def _read_point(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not run yet (an atomic write never leaves half a file; a damaged one reruns)
    return rec if isinstance(rec, dict) and "status" in rec else None


def sweep_rows(points: list[Point], records: dict[str, dict]) -> list[dict]:
    """A row per point and engine: point, point_id, the swept keys, engine, status, error, metrics."""
    rows = []
    for p in points:
        rec = records[p.point_id]
        head = {"point": p.index, "point_id": p.point_id, **p.params}
        if rec["status"] != "ok" or not rec["summaries"]:
            rows.append({**head, "engine": None, "status": rec["status"], "error": rec["error"]})
            continue
        for engine, metrics in rec["summaries"].items():
            rows.append({**head, "engine": engine, "status": "ok", "error": None,
                         **{k: v for k, v in metrics.items() if k != "engine"}})
    return rows


def _kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return "str" if isinstance(v, str) else "other"


def write_sweep_table(points: list[Point], records: dict[str, dict], out_dir: Path) -> Path:
    import pyarrow as pa

    from fastsim.output import write_table_atomic

    rows = sweep_rows(points, records)
    keys = list(points[0].params)
    columns: dict[str, list] = {}
    for row in rows:
        for k in row:
            columns.setdefault(k, [])
    for k in columns:
        values = [row.get(k) for row in rows]
        kinds = {_kind(v) for v in values if v is not None}
        if len(kinds) > 1 or "other" in kinds:
            values = [None if v is None else json.dumps(v) if _kind(v) == "other" else str(v) for v in values]
        columns[k] = values
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    table = table.replace_schema_metadata({"fastsim.swept_keys": json.dumps(keys)})
    return write_table_atomic(table, out_dir / TABLE_NAME, "parquet")
