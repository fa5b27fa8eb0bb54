"""`fastsim plot`: figures from what fastsim wrote — a run's latency CDFs and timeline, a sweep's
throughput and latency against the swept rate, a search's cost/latency Pareto frontier. Each figure
is written as PNG and SVG."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fastsim.errors import FastsimError
from fastsim.output import FIGURE_FORMATS, PLOTS_DIR, remove_figures, replacing

FIGSIZE = (10.0, 4.0)  # inches
DPI = 100
_LATENCIES = [("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("e2el_ms", "end-to-end latency (ms)")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _read_table(path: Path):
    import pyarrow.csv as pacsv
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.read_table(path)
    if path.suffix == ".arrow":
        with ipc.open_file(path) as f:
            return f.read_all()
    return pacsv.read_csv(path)


def _find(results: Path, stem: str) -> Path | None:
    for ext in (".parquet", ".arrow", ".csv"):
        if (results / f"{stem}{ext}").exists():
            return results / f"{stem}{ext}"
    return None


def _names(table, column: str) -> list[str]:
    """The distinct values of a string (or dictionary) column, in order of first appearance."""
    import pyarrow.compute as pc

    return [v for v in pc.unique(table.column(column).cast("string")).to_pylist() if v is not None]


def _equal(table, column: str, value: str) -> np.ndarray:
    """Rows whose column equals value, as a NumPy mask (no Python loop over the rows)."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.equal(table.column(column).cast("string"), value), False).to_numpy(zero_copy_only=False)


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    """PNG and SVG, each whole or not at all (output.replacing)."""
    written = []
    for fmt in FIGURE_FORMATS:
        path = out_dir / f"{name}.{fmt}"
        with replacing(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI)
        written.append(path)
    _pyplot().close(fig)
    return written


def latency_cdfs(requests, out_dir: Path) -> list[Path]:
    """CDF of TTFT, TPOT and end-to-end latency over finished requests, a line per engine."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=FIGSIZE, constrained_layout=True)
    finished = _equal(requests, "status", "finished")
    names = _names(requests, "engine")
    for ax, (col, label) in zip(axes, _LATENCIES):
        values = requests.column(col).to_numpy(zero_copy_only=False).astype(float)
        for name in names:
            v = np.sort(values[_equal(requests, "engine", name) & finished & ~np.isnan(values)])
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle("latency CDFs (finished requests)")
    return _save(fig, out_dir, "latency_cdf")


def timeline(tl, out_dir: Path) -> list[Path]:
    """KV blocks in use and requests waiting / running over simulated time, a line per engine."""
    plt = _pyplot()
    fig, (kv, queue) = plt.subplots(1, 2, figsize=FIGSIZE, constrained_layout=True)
    col = {c: tl.column(c).to_numpy(zero_copy_only=False) for c in
           ("start_s", "kv_blocks_used", "num_waiting", "num_running")}
    names = _names(tl, "engine") if "engine" in tl.column_names else [""]
    for name in names:
        m = _equal(tl, "engine", name) if name else np.ones(tl.num_rows, np.bool_)
        t = col["start_s"][m]
        kv.plot(t, col["kv_blocks_used"][m], label=name or None, lw=0.8)
        queue.plot(t, col["num_waiting"][m], label=f"{name} waiting".strip(), lw=0.8)
        queue.plot(t, col["num_running"][m], label=f"{name} running".strip(), lw=0.8, ls="--")
    kv.set_xlabel("simulated time (s)")
    kv.set_ylabel("KV-cache blocks in use")
    queue.set_xlabel("simulated time (s)")
    queue.set_ylabel("requests")
    for ax in (kv, queue):
        ax.grid(alpha=0.3)
    queue.legend(loc="upper right", fontsize="small")
    if len(names) > 1:
        kv.legend(loc="upper right", fontsize="small")
    fig.suptitle("KV-cache use and queues over time (one point per iteration; replicas together)")
    return _save(fig, out_dir, "timeline")


def _x_key(keys: list[str], x: str | None) -> str:
    if x is not None:
        if x not in keys:
            raise FastsimError(f"plot --x {x!r}: not a swept key; the sweep varied {', '.join(keys)}")
        return x
    rates = [k for k in keys if k.endswith("rate")]
    return rates[0] if rates else keys[0]


def sweep_curves(table, out_dir: Path, x: str | None = None) -> list[Path]:
    """Throughput and latency against a swept key (the arrival rate by default), a line per engine
    and combination of the other swept keys."""
    plt = _pyplot()
    meta = table.schema.metadata or {}
    keys = json.loads(meta.get(b"fastsim.swept_keys", b"[]"))
    if not keys:
        raise FastsimError("plot: this sweep table has no swept keys recorded (was it written by fastsim sweep?)")
    xk = _x_key(keys, x)
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    if not rows:
        raise FastsimError("plot: no point of this sweep succeeded; nothing to draw")
    others = [k for k in keys if k != xk]
    series: dict[str, list[dict]] = {}
    for r in rows:
        label = ", ".join([f"{k.rsplit('.', 1)[-1]}={r[k]}" for k in others] + ([r["engine"]] if r["engine"] else []))
        series.setdefault(label, []).append(r)
    written = []
    panels = {"sweep_throughput": [("request_throughput", "completed requests/s"),
                                   ("output_throughput", "output tokens/s")],
              "sweep_latency": [("p99_ttft_ms", "p99 TTFT (ms)"), ("p99_tpot_ms", "p99 TPOT (ms)")]}
    for name, metrics in panels.items():
        fig, axes = plt.subplots(1, 2, figsize=FIGSIZE, constrained_layout=True)
        for ax, (metric, label) in zip(axes, metrics):
            for s_label, pts in series.items():
                pts = sorted(pts, key=lambda r: r[xk])
                ax.plot([r[xk] for r in pts], [np.nan if r.get(metric) is None else r[metric] for r in pts],
                        marker="o", ms=3, label=s_label or None)
            ys = np.array([r[metric] for r in rows if r.get(metric) is not None and r[metric] > 0], float)
            if metric.endswith("_ms") and ys.size and ys.max() > 100 * ys.min():
                ax.set_yscale("log")  # queueing delays span orders of magnitude past saturation
            ax.set_xlabel(xk + (" (requests/s)" if xk.endswith("rate") else ""))
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        if len(series) > 1 and len(series) <= 12:
            axes[1].legend(fontsize="small")
        fig.suptitle(f"{'throughput' if name.endswith('throughput') else 'latency'} against {xk}")
        written += _save(fig, out_dir, name)
    return written


OBJECTIVE_LABELS = {"cost_usd_per_hour": "cost (US$ per hour)", "usd_per_1m_output_tokens": "US$ per 1M output tokens",
                    "energy_per_1k_output_tokens_j": "energy per 1K output tokens (J)", "num_gpus": "GPUs",
                    "mean_power_w": "mean power per GPU (W)"}


def pareto_frontier(table, out_dir: Path) -> list[Path]:
    """The search objective (cost by default) against latency of every deployment simulated; the
    frontier joined."""
    plt = _pyplot()
    meta = json.loads((table.schema.metadata or {}).get(b"fastsim.search", b"{}"))
    lat = meta.get("latency", "p99_ttft_ms")
    obj = meta.get("objective", "cost_usd_per_hour")
    rows = table.to_pylist()
    fig, ax = plt.subplots(figsize=FIGSIZE, constrained_layout=True)
    for meets, style in ((False, dict(marker="x", color="0.6", label="misses the SLOs")),
                         (True, dict(marker="o", color="C0", label="meets the SLOs"))):
        pts = [r for r in rows if r["meets"] == meets and r.get(lat) is not None and r.get(obj) is not None]
        ax.scatter([r[obj] for r in pts], [r[lat] for r in pts], s=18, **style)
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r[obj])
    if front:
        ax.plot([r[obj] for r in front], [r[lat] for r in front], color="C3", lw=1.5,
                drawstyle="steps-post", label="Pareto frontier")
        for r in front:
            ax.annotate(f"{r['data_parallel_size']}x{r['gpu']} TP{r['tensor_parallel_size']}",
                        (r[obj], r[lat]), fontsize="x-small", xytext=(3, 3),
                        textcoords="offset points")
    ys = [r[lat] for r in rows if r.get(lat)]
    if ys and max(ys) > 100 * min(ys):
        ax.set_yscale("log")
    ax.set_xlabel(OBJECTIVE_LABELS.get(obj, obj))
    ax.set_ylabel(lat.replace("_ms", " (ms)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    rate = meta.get("request_rate")
    ax.set_title(f"deployments at {rate:g} requests/s: " + ", ".join(meta.get("slos", [])) if rate else "deployments")
    return _save(fig, out_dir, "pareto")


def plot_results(results: Path, out_dir: Path | None = None, x: str | None = None) -> list[Path]:
    """Every figure the folder's files allow."""
    if not results.is_dir():
        raise FastsimError(f"plot: {str(results)!r} is not a folder fastsim wrote (fastsim run / sweep --out)")
    out_dir = out_dir or results / PLOTS_DIR
    written: list[Path] = []
    if (p := _find(results, "requests")) is not None:
        written += latency_cdfs(_read_table(p), out_dir)
    if (p := _find(results, "timeline")) is not None:
        written += timeline(_read_table(p), out_dir)
    if (results / "sweep.parquet").exists():
        written += sweep_curves(_read_table(results / "sweep.parquet"), out_dir, x)
    if (results / "search.parquet").exists():
        written += pareto_frontier(_read_table(results / "search.parquet"), out_dir)
    if not written:
        raise FastsimError(f"plot: {results} holds no requests, timeline, sweep or search table to plot")
    remove_figures(out_dir, keep=set(written))  # an earlier run's figures this one has no data for
    return written
