"""Sampling token-count distributions and reading length columns from files."""
from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fastsim import config as C
from fastsim.errors import FastsimError


def builtin_dataset_path(name: str) -> Path:
    return Path(str(resources.files("fastsim.workload") / "data" / f"{name}_lengths.csv"))


def read_table(path: str) -> pa.Table:
    """A CSV or Parquet file as a table; re-read only when the file changes (clients often share one)."""
    try:
        st = Path(path).stat()
    except OSError as e:
        raise FastsimError(f"workload: cannot read {path!r} ({e.strerror})") from None
    return _read_table(path, st.st_mtime_ns, st.st_size)


@cache
def _read_table(path: str, mtime_ns: int, size: int) -> pa.Table:
    p = Path(path)
    try:
        if p.suffix in (".parquet", ".pq"):
            return pq.read_table(p)
        return pacsv.read_csv(p)
    except (OSError, pa.ArrowInvalid) as e:
        raise FastsimError(f"workload: cannot read {path!r} as {'Parquet' if p.suffix == '.parquet' else 'CSV'} "
                           f"({str(e).splitlines()[0]})") from None


def read_column(path: str, column: str, field: str) -> np.ndarray:
    """Positive integer token counts from one column of a CSV or Parquet file."""
    table = read_table(path)
    if column not in table.column_names:
        raise FastsimError(f"{field}: {path!r} has no column {column!r}; it has {', '.join(table.column_names)}")
    values = table.column(column).to_numpy(zero_copy_only=False)
    if values.dtype.kind not in "iuf":
        raise FastsimError(f"{field}: column {column!r} of {path!r} is not numeric ({values.dtype})")
    values = values.astype(np.float64)
    bad = ~np.isfinite(values) | (values < 1)
    if bad.any():
        row = int(np.argmax(bad))
        raise FastsimError(f"{field}: {path!r} column {column!r} row {row + 1} is {values[row]!r}; "
                           "token counts must be >= 1")
    if values.size == 0:
        raise FastsimError(f"{field}: {path!r} column {column!r} is empty")
    return np.rint(values).astype(np.int64)


def _raw(spec, n: int, rng: np.random.Generator, field: str) -> np.ndarray:
    if isinstance(spec, C.Constant):
        return np.full(n, float(spec.value))
    if isinstance(spec, C.Uniform):
        return rng.integers(spec.low, spec.high + 1, size=n).astype(np.float64)
    if isinstance(spec, C.Normal):
        if spec.std == 0:
            return np.full(n, spec.mean)
        lo = (spec.min - 0.5 - spec.mean) / spec.std
        hi = np.inf if spec.max is None else (spec.max + 0.5 - spec.mean) / spec.std
        from scipy import stats  # here, not at the top: importing scipy.stats costs every command ~1 s

        return stats.truncnorm.rvs(lo, hi, loc=spec.mean, scale=spec.std, size=n, random_state=rng)
    if isinstance(spec, C.Lognormal):
        # From the mean m and standard deviation s of the counts: sigma^2 = ln(1 + s^2/m^2),
        # mu = ln(m) - sigma^2 / 2.
        sigma2 = np.log1p((spec.std / spec.mean) ** 2)
        return rng.lognormal(np.log(spec.mean) - sigma2 / 2, np.sqrt(sigma2), size=n)
    if isinstance(spec, C.Gamma):
        shape = (spec.mean / spec.std) ** 2
        return rng.gamma(shape, spec.std**2 / spec.mean, size=n)
    if isinstance(spec, C.Weibull):
        return spec.scale * rng.weibull(spec.shape, size=n)
    if isinstance(spec, C.Pareto):
        return spec.scale * (1.0 + rng.pareto(spec.shape, size=n))
    if isinstance(spec, C.Empirical):
        path = spec.file or str(builtin_dataset_path(spec.dataset))
        values = read_column(path, spec.column, field)
        return values[rng.integers(0, values.size, size=n)].astype(np.float64)
    if isinstance(spec, C.Mixture):
        w = np.array([c.weight for c in spec.components])
        pick = rng.choice(len(w), size=n, p=w / w.sum())
        out = np.empty(n)
        for i, comp in enumerate(spec.components):
            mask = pick == i
            out[mask] = sample_lengths(comp.spec, int(mask.sum()), rng, f"{field}.components.{i}")
        return out
    raise TypeError(f"unknown distribution {spec!r}")


def sample_lengths(spec, n: int, rng: np.random.Generator, field: str) -> np.ndarray:
    """n token counts (int64) from `spec`, rounded and held within [min, max]."""
    x = np.rint(_raw(spec, n, rng, field))
    x = np.maximum(x, spec.min)
    # A heavy tail may draw beyond any context; C.MAX_TOKENS keeps such a request (rejected as too
    # long, as it would be anyway) representable.
    x = np.minimum(x, C.MAX_TOKENS if spec.max is None else spec.max)
    return x.astype(np.int64)
