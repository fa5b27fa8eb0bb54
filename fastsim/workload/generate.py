"""From the workload section of a config to request arrays sorted by arrival."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fastsim import config as C
from fastsim.errors import FastsimError
from fastsim.workload.distributions import builtin_dataset_path, read_column, sample_lengths
from fastsim.workload.traces import read_trace


@dataclass(frozen=True)
class Workload:
    """One row per request, sorted by arrival time (ties keep client order)."""

    arrival_s: np.ndarray      # float64
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    client: np.ndarray         # int32 index into client_names
    client_names: tuple[str, ...]
    # Prompt content as ids of consecutive `block_tokens`-token blocks (equal ids = equal content),
    # ragged: request i's are block_ids[block_offsets[i]:block_offsets[i + 1]]. Empty = unique.
    block_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    block_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    block_tokens: int = 0

    def __len__(self) -> int:
        return self.arrival_s.size


def _rate(arrival) -> float | None:
    return getattr(arrival, "rate", None)


def split_requests(total: int, clients: list[C.Client]) -> list[int]:
    """Each client's share of `total`: its own num_requests, or the rest split by rate
    (largest remainder; batch clients weigh as much as the mean rate)."""
    fixed = [c.num_requests for c in clients]
    rest = [i for i, f in enumerate(fixed) if f is None]
    left = max(total - sum(f for f in fixed if f), 0)
    if not rest:
        return [int(f) for f in fixed]
    rates = [_rate(clients[i].arrival) if clients[i].arrival is not None else None for i in rest]
    known = [r for r in rates if r]
    fill = float(np.mean(known)) if known else 1.0
    w = np.array([r or fill for r in rates], dtype=float)
    exact = left * w / w.sum()
    share = np.floor(exact).astype(int)
    share[np.argsort(-(exact - share), kind="stable")[: left - share.sum()]] += 1
    out = [int(f) if f else 0 for f in fixed]
    for i, s in zip(rest, share):
        out[i] = int(s)
    return out


def arrivals(spec, n: int | None, duration_s: float | None, rng: np.random.Generator) -> np.ndarray:
    """Arrival times: exactly n of them, or all of them before duration_s."""
    if isinstance(spec, C.Batch):
        return np.full(n or 0, spec.at_s)
    if isinstance(spec, C.ConstantRate):
        count = n if n is not None else int(np.ceil(duration_s * spec.rate))
        t = np.arange(count) / spec.rate
        return t if n is not None else t[t < duration_s]

    def gaps(k: int) -> np.ndarray:
        if isinstance(spec, C.Poisson):
            return rng.exponential(1.0 / spec.rate, size=k)
        shape = 1.0 / spec.cv**2  # gamma with mean 1/rate and the given CV
        return rng.gamma(shape, 1.0 / (spec.rate * shape), size=k)

    if n is not None:
        return np.cumsum(gaps(n))
    out, t0 = [], 0.0
    chunk = max(16, int(duration_s * spec.rate * 1.1) + 16)
    while True:
        t = t0 + np.cumsum(gaps(chunk))
        out.append(t[t < duration_s])
        if t[-1] >= duration_s:
            return np.concatenate(out)
        t0 = t[-1]


def replay(client: C.Client, limit: int | None, duration_s: float | None, rng: np.random.Generator, field: str):
    """A trace client's (arrival_s, prompt, output): windowed, sampled, time-scaled, limited."""
    tr = client.trace
    rows = read_trace(tr.format, tr.file)
    if rows.arrival_s is not None:
        t = rows.arrival_s
        keep = (t >= tr.start_s) & ((t < tr.end_s) if tr.end_s is not None else True)
        rows = rows.take(np.flatnonzero(keep))
    if tr.sample < 1.0:
        rows = rows.take(np.flatnonzero(rng.random(len(rows)) < tr.sample))
    if rows.arrival_s is None:
        if client.arrival is None:
            raise FastsimError(f"{field}.trace: {tr.file} has lengths but no arrival times; give the client "
                               "an arrival process, e.g. arrival: {process: poisson, rate: 5.0}")
        n = len(rows) if limit is None else min(limit, len(rows))
        t = arrivals(client.arrival, n, None, rng)
        return t, rows.take(np.arange(n))
    t = rows.arrival_s - (rows.arrival_s.min() if len(rows) else 0.0)
    t = t / tr.speedup
    if tr.rate is not None and len(rows) > 1 and t.max() > 0:
        t = t * ((len(rows) - 1) / tr.rate / t.max())
    n = len(rows) if limit is None else min(limit, len(rows))
    if duration_s is not None:
        n = min(n, int(np.searchsorted(t, duration_s, side="left")))
    return t[:n], rows.take(np.arange(n))


def generate_workload(wl: C.Workload, seed: int) -> Workload:
    counts = split_requests(wl.num_requests, wl.clients) if wl.num_requests else [c.num_requests for c in wl.clients]
    parts = []
    blocks: dict[int, tuple] = {}  # client -> (offsets, ids, tokens per block) of its prompts
    for i, client in enumerate(wl.clients):
        # One independent stream per client: adding a client leaves the others' samples unchanged.
        rng = np.random.default_rng([seed, i])
        field = f"workload.clients.{i}"
        if client.trace is not None:
            limit = client.num_requests or (counts[i] if wl.num_requests else None)
            t, rows = replay(client, limit, wl.duration_s, rng, field)
            parts.append((t, rows.prompt_tokens, rows.output_tokens, np.full(t.size, i, dtype=np.int32)))
            if rows.hash_offsets is not None:
                blocks[i] = (rows.hash_offsets, rows.hash_ids, rows.hash_block_tokens)
            continue
        t = arrivals(client.arrival, counts[i], None if counts[i] is not None else wl.duration_s, rng)
        n = t.size
        if client.dataset is not None:
            path = client.dataset.file or str(builtin_dataset_path(client.dataset.name))
            p = read_column(path, client.dataset.prompt_column, f"{field}.dataset")
            o = read_column(path, client.dataset.output_column, f"{field}.dataset")
            rows = rng.integers(0, p.size, size=n)
            prompt, output = p[rows], o[rows]
        else:
            prompt = sample_lengths(client.prompt_tokens, n, rng, f"{field}.prompt_tokens")
            output = sample_lengths(client.output_tokens, n, rng, f"{field}.output_tokens")
        parts.append((t, prompt, output, np.full(n, i, dtype=np.int32)))
    t = np.concatenate([p[0] for p in parts]).astype(np.float64)
    order = np.argsort(t, kind="stable")
    offsets, ids, block_tokens = _merge_blocks(parts, blocks, order)
    return Workload(t[order], np.concatenate([p[1] for p in parts])[order].astype(np.int64),
                    np.concatenate([p[2] for p in parts])[order].astype(np.int64),
                    np.concatenate([p[3] for p in parts])[order], tuple(c.name for c in wl.clients),
                    offsets, ids, block_tokens)


def _merge_blocks(parts: list, blocks: dict, order: np.ndarray):
    """Every request's block ids in arrival order (none for clients without), one block size."""
    sizes = {b[2] for b in blocks.values()}
    if len(sizes) > 1:
        raise FastsimError(f"workload: traces with different block sizes ({sorted(sizes)}) cannot share a cache")
    n = order.size
    if not blocks:
        return np.zeros(n + 1, np.int64), np.zeros(0, np.int64), 0
    lens = np.concatenate([np.diff(blocks[i][0]) if i in blocks else np.zeros(p[0].size, np.int64)
                           for i, p in enumerate(parts)])
    ids = np.concatenate([blocks[i][1] for i in sorted(blocks)]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])  # where each request's ids start, client order
    new_lens = lens[order]
    offsets = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], new_lens)
    return offsets, ids[np.repeat(starts[order], new_lens) + within], sizes.pop()
