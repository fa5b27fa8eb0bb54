"""Error tables over validation rows: by source, GPU, model, TP, framework and metric."""
from __future__ import annotations

import numpy as np

from fastsim.validation.published import Row

GROUPS = {  # table title -> a row's key in it
    "source": lambda r: r.point.source,
    "GPU": lambda r: r.point.gpu,
    "model": lambda r: r.point.model.split("/")[-1],
    "TP": lambda r: str(r.point.tp),
    "framework": lambda r: r.point.framework,
    "metric": lambda r: r.metric,
    "metric class": lambda r: r.metric_class,
}


def error_stats(rows: list[Row]) -> dict:
    """count, median and p90 of |error|, median signed error, share over-predicted (fractions)."""
    e = np.array([r.error for r in rows])
    if e.size == 0:
        return {"count": 0, "median": np.nan, "p90": np.nan, "bias": np.nan, "over": np.nan}
    return {"count": int(e.size), "median": float(np.median(np.abs(e))), "p90": float(np.percentile(np.abs(e), 90)),
            "bias": float(np.median(e)), "over": float(np.mean(e > 0))}


def grouped(rows: list[Row], key) -> dict[str, dict]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return {k: error_stats(v) for k, v in sorted(groups.items())}


def markdown_tables(rows: list[Row], worst: int = 15) -> str:
    """Every table as Markdown: the whole set, each grouping, then the worst rows."""
    def line(name, s):
        return (f"| {name} | {s['count']} | {100 * s['median']:.1f}% | {100 * s['p90']:.1f}% | "
                f"{100 * s['bias']:+.1f}% | {100 * s['over']:.0f}% |")

    head = "| {} | rows | median \\|error\\| | p90 \\|error\\| | median error | over-predicted |\n|---|---|---|---|---|---|"
    out = [head.format("set"), line("all", error_stats(rows)), ""]
    for title, key in GROUPS.items():
        out.append(f"By {title}:\n")
        out.append(head.format(title))
        out += [line(k, s) for k, s in grouped(rows, key).items()]
        out.append("")
    out.append(f"The {worst} worst rows:\n")
    out.append("| point | source | model | GPU | TP | workload | metric | measured | fastsim | error |\n"
               "|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -abs(r.error))[:worst]:
        p = r.point
        out.append(f"| {p.point_id} | {p.source} | {p.model.split('/')[-1]} | {p.gpu} | {p.tp} | {workload(p)} | "
                   f"{r.metric} | {r.measured:.4g} | {r.predicted:.4g} | {100 * r.error:+.1f}% |")
    return "\n".join(out) + "\n"


def workload(p) -> str:
    lengths = f"{p.input_len}/{p.output_len}" if p.input_len is not None else "ShareGPT"
    if p.kind in ("static_batch_latency", "static_batch_prefill"):
        return f"batch {p.batch} x {lengths}"
    if p.kind.startswith("offline"):
        return f"offline {lengths}"
    return f"{lengths} at {p.rate:g}/s" if np.isfinite(p.rate) else f"{lengths} all at once"
