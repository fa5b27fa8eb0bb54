"""Fit a CostProfile to measured step times (the format of fastsim/cost/data/*_steps.csv).

Micro-benchmark rows alone (`gemm_peak`, `copy_bw`, `gemm`) fix the GEMM and bandwidth physics;
layer rows (`prefill`, `decode`, `mixed`), when present, also fix attention and small-kernel costs.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from fastsim.catalog import GpuSpec
from fastsim.catalog.models import ModelSpec
from fastsim.cost.model import CostModel
from fastsim.cost.profile import CostProfile
from fastsim.errors import FastsimError

# Attention timed alone is a secondary target: it keeps the attention parameters physical without
# letting one simple attention model dominate the whole-model fit.
ATTN_WEIGHT = 0.3
LAYER_KINDS = ("prefill", "decode", "mixed")
_SHAPE_COLS = ("hidden", "heads", "kv_heads", "head_dim", "inter", "vocab", "layers")


@dataclass(frozen=True)
class LayerRow:
    """One measured iteration shape: `layers * layer_ms + lm_head_ms` is the whole-model forward."""

    model: ModelSpec
    kind: str
    batch: int
    seq_len: int
    ctx_len: int
    chunk: int
    layer_ms: float
    lm_head_ms: float
    attn_ms: float | None = None  # attention alone, one layer (prefill and decode rows)

    @property
    def forward_ms(self) -> float:
        return self.model.num_hidden_layers * self.layer_ms + self.lm_head_ms

    def forward_args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(decode_context_lens, prefill_new_tokens, prefill_context_lens) of this row.

        The measuring program's decode `ctx_len` counts the new token, so the cached context is one less.
        """
        none = np.zeros(0, dtype=np.int64)
        if self.kind == "prefill":
            return none, np.full(self.batch, self.seq_len), np.zeros(self.batch, dtype=np.int64)
        if self.kind == "decode":
            return np.full(self.batch, self.ctx_len - 1), none, none
        return (np.full(self.batch - 1, self.ctx_len - 1), np.array([self.chunk]), np.array([0]))


@dataclass
class Measurements:
    gpu: str = ""
    gemm: list[tuple[int, int, int, float]] = field(default_factory=list)  # M, K, N, ms
    copy_gb_s: float | None = None
    layers: list[LayerRow] = field(default_factory=list)


def _num(row: dict, col: str, where: str, cast=float):
    try:
        return cast(float(row[col])) if cast is int else cast(row[col])
    except (KeyError, TypeError, ValueError):
        raise FastsimError(f"{where}: column {col!r} = {row.get(col)!r} is not a number") from None


def read_measurements(path: str | Path) -> Measurements:
    """Parse a step-times CSV; rows whose note starts with 'error' (failed measurements) are skipped."""
    path = Path(path)
    try:
        fh = path.open(newline="")
    except OSError as e:
        raise FastsimError(f"measurements: cannot open {str(path)!r} ({e.strerror})") from None
    out = Measurements()
    with fh:
        reader = csv.DictReader(fh)
        need = {"kind", "batch", "stack_ms"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise FastsimError(f"{path}: not a step-times CSV; it needs the columns "
                               f"{', '.join(sorted(need))} (see fastsim/cost/data/measure_steps.py)")
        shapes: dict[tuple, ModelSpec] = {}
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            kind, note = row["kind"], row.get("note") or ""
            if note.startswith("error"):
                continue
            out.gpu = out.gpu or row.get("gpu", "")
            if kind in ("gemm_peak", "gemm"):
                m = _num(row, "batch", where, int)
                k, n = (m, m) if kind == "gemm_peak" else (_num(row, "seq_len", where, int), _num(row, "ctx_len", where, int))
                out.gemm.append((m, k, n, _num(row, "stack_ms", where)))
            elif kind == "copy_bw":
                nbytes = _num(row, "batch", where)
                out.copy_gb_s = 2 * nbytes / (_num(row, "stack_ms", where) * 1e-3) / 1e9
            elif kind in LAYER_KINDS:
                key = tuple(_num(row, c, where, int) for c in _SHAPE_COLS)
                if key not in shapes:
                    h, nq, nkv, hd, inter, vocab, nl = key
                    shapes[key] = ModelSpec(name=row.get("model") or "measured", hidden_size=h,
                                            num_hidden_layers=nl, num_attention_heads=nq,
                                            num_key_value_heads=nkv, head_dim=hd, intermediate_size=inter,
                                            vocab_size=vocab, max_position_embeddings=1 << 20)
                out.layers.append(LayerRow(
                    shapes[key], kind, _num(row, "batch", where, int), _num(row, "seq_len", where, int),
                    _num(row, "ctx_len", where, int), int(float(row.get("chunk") or 0)),
                    _num(row, "layer_ms", where), _num(row, "lm_head_ms", where),
                    _num(row, "attn_ms", where) if row.get("attn_ms") else None))
    if not out.gemm and not out.layers:
        raise FastsimError(f"{path}: no gemm, gemm_peak or layer rows to fit; "
                           "measure some with measure_steps.py")
    return out


def predict_ms(profile: CostProfile, gpu: GpuSpec, rows: list[LayerRow]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted whole-model forward ms and one layer's attention ms for each row."""
    models: dict[ModelSpec, CostModel] = {}
    fwd, attn = np.empty(len(rows)), np.empty(len(rows))
    for i, r in enumerate(rows):
        cm = models.get(r.model) or models.setdefault(r.model, CostModel.create(r.model, gpu, profile=profile))
        fwd[i] = cm.forward_time(*r.forward_args()).total_s * 1e3
        attn[i] = cm.attention_time(*r.forward_args()) * 1e3
    return fwd, attn


# Parameters each data set can pin down, with bounds that keep them physical.
_MICRO = {"compute_efficiency": (0.2, 1.0), "bandwidth_efficiency": (0.3, 1.0),
          "gemm_latency_us": (0.0, 50.0)}
_LAYER = {"attention_efficiency": (0.05, 1.0), "attention_bandwidth_efficiency": (0.1, 1.0),
          "attention_latency_us": (1.0, 20.0), "attention_half_fill_tiles": (0.0, 5000.0), "kernel_latency_us": (0.5, 10.0)}


def fit_profile(meas: Measurements, gpu: GpuSpec, base: CostProfile | None = None) -> CostProfile:
    """Least squares on log(predicted / measured) over every usable row."""
    base = base or CostProfile()
    fixed: dict = {"fitted_on": f"{meas.gpu or gpu.name}: {len(meas.gemm)} GEMM rows, "
                                f"{len(meas.layers)} layer rows",
                   "reference_clock_mhz": gpu.boost_clock_mhz}
    if meas.copy_gb_s:
        fixed["elementwise_bandwidth_efficiency"] = min(1.0, meas.copy_gb_s / gpu.mem_bw_gb_s)
    free = dict(_MICRO) if meas.gemm else {}
    if meas.layers:
        free.update(_LAYER)
    names = list(free)
    lo = np.array([free[k][0] for k in names])
    hi = np.array([free[k][1] for k in names])
    x0 = np.clip(np.array([getattr(base, k) for k in names], dtype=float), lo + 1e-9, hi - 1e-9)
    gemm = np.array(meas.gemm, dtype=float).reshape(-1, 4)
    fwd_measured = np.array([r.forward_ms for r in meas.layers])
    # Attention timed alone pins the attention parameters, so the per-kernel floors cannot hide in them.
    has_attn = np.array([r.attn_ms is not None for r in meas.layers], dtype=bool)
    attn_measured = np.array([r.attn_ms or 1.0 for r in meas.layers])

    def profile_at(x) -> CostProfile:
        return base.model_copy(update={**fixed, **dict(zip(names, map(float, x)))})

    def residuals(x):
        prof = profile_at(x)
        res = [np.log(gemm_ms(prof, gpu, gemm[:, 0], gemm[:, 1], gemm[:, 2]) / gemm[:, 3])]
        if meas.layers:
            fwd, attn = predict_ms(prof, gpu, meas.layers)
            res.append(np.log(fwd / fwd_measured))
            res.append(ATTN_WEIGHT * np.log(attn[has_attn] / attn_measured[has_attn]))
        return np.concatenate(res)

    if names:
        x = least_squares(residuals, x0, bounds=(lo, hi), x_scale="jac").x
    else:
        x = x0
    return profile_at(x)


def gemm_ms(profile: CostProfile, gpu: GpuSpec, m, k, n) -> np.ndarray:
    """Time of 16-bit (m x k) @ (k x n) GEMMs under `profile`, in ms."""
    cm = CostModel.create(_ANY_MODEL, gpu, profile=profile)
    return np.array([cm.gemm_time(int(a), int(b), int(c)) for a, b, c in zip(m, k, n)]) * 1e3


# GEMM timing does not depend on the model; CostModel just needs one to exist.
_ANY_MODEL = ModelSpec(name="gemm", hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                       num_key_value_heads=1, head_dim=64, intermediate_size=64, vocab_size=64,
                       max_position_embeddings=64)
