"""How far the cost model's forward time is from measured whole-model forward times."""
from __future__ import annotations

import numpy as np
from rich.table import Table

from fastsim.catalog import GpuSpec
from fastsim.cost.calibrate import LAYER_KINDS, LayerRow, predict_ms
from fastsim.cost.profile import CostProfile


def error_stats(profile: CostProfile, gpu: GpuSpec, rows: list[LayerRow]) -> dict[str, dict[str, float]]:
    """Per kind: median, p90 and max absolute percentage error of forward_time vs
    `layers * layer_ms + lm_head_ms`, and the row count."""
    pred, _ = predict_ms(profile, gpu, rows)
    err = np.abs(pred / np.array([r.forward_ms for r in rows]) - 1.0) * 100.0
    kinds = np.array([r.kind for r in rows])
    out = {}
    for kind in LAYER_KINDS:
        e = err[kinds == kind]
        if e.size:
            out[kind] = {"rows": int(e.size), "median_pct": float(np.median(e)),
                         "p90_pct": float(np.percentile(e, 90)), "max_pct": float(e.max())}
    return out


def error_table(profile: CostProfile, gpu: GpuSpec, rows: list[LayerRow]) -> Table:
    t = Table("kind", "rows", "median |err| %", "p90 |err| %", "max |err| %",
              title="forward_time vs measured whole-model forward")
    for kind, s in error_stats(profile, gpu, rows).items():
        t.add_row(kind, str(s["rows"]), f"{s['median_pct']:.2f}", f"{s['p90_pct']:.2f}", f"{s['max_pct']:.2f}")
    return t
