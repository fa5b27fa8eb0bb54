"""From the workload section of a config to request arrays sorted by arrival."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from fastsim import config as C
from fastsim.errors import FastsimError
from fastsim.workload.distributions import builtin_dataset_path, read_column, sample_lengths
from fastsim.workload.traces import read_trace



class BlockSources(NamedTuple):
    """Per request, what names its KV blocks (fastsim.engine.prefix_nb.block_content_nb): its prompt's
    source block ids (ragged: ids[offsets[i]:offsets[i+1]]), its prompt length, its token sequence
    (a conversation's turns share one) and its client's shared system prompt (length and id)."""

    offsets: np.ndarray
    ids: np.ndarray
    prompt: np.ndarray
    seq: np.ndarray
    shared_len: np.ndarray
    shared_id: np.ndarray


@dataclass(frozen=True)
class Workload:
    """One row per request, sorted by arrival time (ties keep client order). A later turn of a
    conversation arrives when the previous turn finishes plus its think time, which only the
    simulation knows: its `arrival_s` is the time it would arrive if answers took no time (it
    orders the rows and places warm-up/cool-down windows) and `think_s` >= 0 marks it."""

    arrival_s: np.ndarray      # float64
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    client: np.ndarray         # int32 index into client_names
    client_names: tuple[str, ...]
    # Prompt content as ids of consecutive `block_tokens`-token blocks (equal ids = equal content),
    # ragged: request i's are block_ids[block_offsets[i]:block_offsets[i + 1]]. Empty = unique.
    block_offsets: np.ndarray = None
    block_ids: np.ndarray = None
    block_tokens: int = 0
    # Conversations: session (-1: none), turn number (0-based), the next turn's row (-1: none; a
    # closed loop's -2 - row: the first of its requests from that row on still to send, whichever of
    # its requests finishes), and for later turns the think time after the previous answer (-1.0
    # for first turns).
    session: np.ndarray = None
    turn: np.ndarray = None
    next_turn: np.ndarray = None
    think_s: np.ndarray = None
    # Shared content: the first shared_tokens[i] tokens are the same for every request with the
    # same shared_id (a client's system prompt); beyond that, requests with one seq_id (turns of
    # a conversation) share their tokens position by position, others share nothing.
    seq_id: np.ndarray = None
    shared_tokens: np.ndarray = None
    shared_id: np.ndarray = None

    def __post_init__(self):
        n = self.arrival_s.size
        defaults = {"block_offsets": lambda: np.zeros(n + 1, np.int64), "block_ids": lambda: np.zeros(0, np.int64),
                    "session": lambda: np.full(n, -1, np.int64), "turn": lambda: np.zeros(n, np.int64),
                    "next_turn": lambda: np.full(n, -1, np.int64), "think_s": lambda: np.full(n, -1.0),
                    "seq_id": lambda: np.arange(n, dtype=np.int64), "shared_tokens": lambda: np.zeros(n, np.int64),
                    "shared_id": lambda: np.zeros(n, np.int64)}
        for name, make in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, make())

    def __len__(self) -> int:
        return self.arrival_s.size

    def content(self) -> BlockSources:
        """What prefix_nb.block_content_nb names blocks from."""
        return BlockSources(self.block_offsets, self.block_ids, self.prompt_tokens, self.seq_id, self.shared_tokens,
                            self.shared_id)


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


def vllm_bench_arrivals(spec, n: int, seed: int) -> np.ndarray:
    """The send times of `vllm bench serve --request-rate R --burstiness B --seed S` for n prompts.
    vLLM seeds NumPy's global generator with S and, for datasets that do not draw from it (ShareGPT:
    Python's random.shuffle), draws one gamma(B, 1/(R*B)) gap per request before sending any
    (vllm/benchmarks/serve.py, get_request). Since PR 21108 (July 2025) the first request waits for
    the first gap and all are rescaled so the last leaves at n / R; before it, benchmark_serving.py
    sent the first at once and each later one after its gap, unscaled. The same floats in the same
    order, so the times are vLLM's to the last bit."""
    shape = 1.0 if isinstance(spec, C.Poisson) else spec.shape
    gaps = np.random.RandomState(seed).gamma(shape, 1.0 / (spec.rate * shape), size=n)
    t = np.cumsum(gaps)  # sequential sums, as vLLM's loop adds them
    if spec.schedule == "vllm_bench_legacy":
        return np.concatenate(([0.0], t[:-1]))
    return t * ((n / spec.rate) / t[-1])


def arrivals(spec, n: int | None, duration_s: float | None, rng: np.random.Generator, seed: int = 0,
             field: str = "workload.clients") -> np.ndarray:
    """Arrival times: exactly n of them, or all of them before duration_s."""
    if isinstance(spec, C.Batch):
        return np.full(n or 0, spec.at_s)
    if isinstance(spec, C.ConstantRate):
        count = n if n is not None else int(np.ceil(duration_s * spec.rate))
        t = np.arange(count) / spec.rate
        return t if n is not None else t[t < duration_s]
    if spec.schedule != "fastsim":
        if n is None:
            raise FastsimError(f"{field}.arrival.schedule: {spec.schedule} sends a set number of requests "
                               "(vllm bench serve's --num-prompts); give workload.num_requests, not duration_s")
        return vllm_bench_arrivals(spec, n, seed if spec.seed is None else spec.seed) if n else np.zeros(0)

    def gaps(k: int) -> np.ndarray:
        if isinstance(spec, C.Poisson):
            return rng.exponential(1.0 / spec.rate, size=k)
        shape = spec.shape  # gamma with mean 1/rate and the given CV
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


def replay(client: C.Client, limit: int | None, duration_s: float | None, rng: np.random.Generator, field: str,
           seed: int = 0):
    """A trace client's (arrival_s, prompt, output): windowed, sampled, time-scaled, limited."""
    tr = client.trace
    rows = read_trace(tr.format, tr.file)
    if not len(rows):
        raise FastsimError(f"{field}.trace: {tr.file} holds no requests; give a trace with at least one")
    if rows.arrival_s is not None:
        t = rows.arrival_s
        keep = (t >= tr.start_s) & ((t < tr.end_s) if tr.end_s is not None else True)
        rows = rows.take(np.flatnonzero(keep))
    if tr.sample < 1.0:
        rows = rows.take(np.flatnonzero(rng.random(len(rows)) < tr.sample))
    if not len(rows):
        raise FastsimError(f"{field}.trace: no request of {tr.file} is left after start_s / end_s / sample; "
                           "widen the window or raise sample")
    if rows.arrival_s is None:
        if client.arrival is None:
            raise FastsimError(f"{field}.trace: {tr.file} has lengths but no arrival times; give the client "
                               "an arrival process, e.g. arrival: {process: poisson, rate: 5.0}")
        n = len(rows) if limit is None else min(limit, len(rows))
        t = arrivals(client.arrival, n, None, rng, seed, field)
        return t, rows.take(np.arange(n))
    t = rows.arrival_s - (rows.arrival_s.min() if len(rows) else 0.0)
    t = t / tr.speedup
    if tr.rate is not None and len(rows) > 1 and t.max() > 0:
        t = t * ((len(rows) - 1) / tr.rate / t.max())
    n = len(rows) if limit is None else min(limit, len(rows))
    if duration_s is not None:
        n = min(n, int(np.searchsorted(t, duration_s, side="left")))
    return t[:n], rows.take(np.arange(n))


def _lengths(client: C.Client, n: int, rng: np.random.Generator, field: str):
    """n (prompt, output) token counts from the client's dataset or distributions."""
    if client.dataset is not None:
        path = client.dataset.file or str(builtin_dataset_path(client.dataset.name))
        p = read_column(path, client.dataset.prompt_column, f"{field}.dataset")
        o = read_column(path, client.dataset.output_column, f"{field}.dataset")
        rows = rng.integers(0, p.size, size=n)
        return p[rows], o[rows]
    return (sample_lengths(client.prompt_tokens, n, rng, f"{field}.prompt_tokens"),
            sample_lengths(client.output_tokens, n, rng, f"{field}.output_tokens"))


def sample_times(spec, n: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(spec, C.ConstantTime):
        return np.full(n, float(spec.value))
    if isinstance(spec, C.ExponentialTime):
        return rng.exponential(spec.mean, size=n)
    if isinstance(spec, C.UniformTime):
        return rng.uniform(spec.low, spec.high, size=n)
    sigma2 = np.log1p((spec.std / spec.mean) ** 2)  # as for lognormal lengths
    return rng.lognormal(np.log(spec.mean) - sigma2 / 2, np.sqrt(sigma2), size=n)


def conversations(client: C.Client, count: int | None, duration_s: float | None, rng: np.random.Generator,
                  field: str, seed: int = 0) -> dict:
    """A conversation client's turns, session by session: `count` turns in all (the last session
    cut short), or every turn of the sessions starting before duration_s."""
    conv = client.conversation
    if count is not None:
        turns = sample_lengths(conv.turns, count, rng, f"{field}.conversation.turns")
        n_sessions = int(np.searchsorted(np.cumsum(turns), count)) + 1
        turns = turns[:n_sessions].copy()
        turns[-1] -= turns.sum() - count
        start = arrivals(client.arrival, n_sessions, None, rng, seed, field)
    else:
        start = arrivals(client.arrival, None, duration_s, rng, seed, field)
        turns = sample_lengths(conv.turns, start.size, rng, f"{field}.conversation.turns")
    n = int(turns.sum())
    first = np.concatenate([[0], np.cumsum(turns)[:-1]]).astype(np.int64)  # each session's first row
    session = np.repeat(np.arange(turns.size), turns)
    turn = np.arange(n) - first[session]
    user, output = _lengths(client, n, rng, field)
    think = sample_times(conv.think_time_s, n, rng)
    think[first] = -1.0
    # Turn k's prompt: the system prompt, every earlier turn's user tokens and answer, its own user tokens.
    grown = np.cumsum(user + output) - output
    prompt = client.system_prompt_tokens + grown - np.repeat(grown[first] - user[first], turns)
    wait = np.cumsum(np.maximum(think, 0.0))
    nominal = start[session] + wait - np.repeat(wait[first], turns)
    next_turn = np.where(turn + 1 < turns[session], np.arange(n) + 1, -1)
    return {"t": nominal, "prompt": prompt, "output": output, "session": session, "turn": turn,
            "next_turn": next_turn, "think_s": think, "seq_id": first[session]}


def closed_loop(client: C.Client, count: int, rng: np.random.Generator, field: str) -> dict:
    """max_concurrency (C) requests at once; whenever one finishes, the first not yet sent goes,
    as vLLM's semaphore sends it: C in flight until the last is sent. The later ones are turns with
    no think time and a prompt of their own, which the engine's turn machinery times; each points
    (-2 - row) at where to look for the first unsent one (heap_nb.next_turn_due_nb). `session` and
    `turn` number them by the order they are sent in (i % C, i // C), not by the slot that sends
    them, which only the run decides."""
    c = client.arrival.max_concurrency
    prompt, output = _lengths(client, count, rng, field)
    rows = np.arange(count)
    # The first c are sent at once; any request that finishes sends the first not yet sent, found
    # from its pointer: the (c+1)-th for the first c, the next one for the rest.
    ptr = np.where(rows < c, c, rows + 1)
    nxt = np.where(ptr < count, -2 - ptr, -1)
    return {"t": np.zeros(count), "prompt": prompt + client.system_prompt_tokens, "output": output,
            "session": rows % c, "turn": rows // c, "next_turn": nxt,
            "think_s": np.where(rows < c, -1.0, 0.0)}


# float64 seconds keep steps of 1.2e-7 s up to 1e9 s: beyond that, latencies of milliseconds blur.
MAX_TIME_S = 1e9


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
            t, rows = replay(client, limit, wl.duration_s, rng, field, seed)
            parts.append({"t": t, "prompt": rows.prompt_tokens, "output": rows.output_tokens})
            if rows.hash_offsets is not None:
                blocks[i] = (rows.hash_offsets, rows.hash_ids, rows.hash_block_tokens)
        elif client.conversation is not None:
            parts.append(conversations(client, counts[i], None if counts[i] is not None else wl.duration_s,
                                       rng, field, seed))
        elif isinstance(client.arrival, C.ClosedLoop):
            if counts[i] is None:
                raise FastsimError(f"{field}.arrival: closed_loop sends a fixed number of requests; give "
                                   "workload.num_requests (or the client's num_requests), not duration_s")
            parts.append(closed_loop(client, counts[i], rng, field))
        else:
            t = arrivals(client.arrival, counts[i], None if counts[i] is not None else wl.duration_s, rng, seed, field)
            prompt, output = _lengths(client, t.size, rng, field)
            parts.append({"t": t, "prompt": prompt + client.system_prompt_tokens, "output": output})
        t = parts[-1]["t"]
        if t.size and np.nanmax(t) > MAX_TIME_S:
            raise FastsimError(f"{field}: its requests arrive over {np.nanmax(t):.3g} s (more than {MAX_TIME_S:.0e} s, "
                               "~30 years), where times lose the precision of milliseconds; raise its arrival rate "
                               "or lower the number of requests")
        parts[-1]["client"] = np.full(parts[-1]["t"].size, i, dtype=np.int32)
        parts[-1]["shared_tokens"] = np.full(parts[-1]["t"].size, client.system_prompt_tokens, dtype=np.int64)
    out = _assemble(wl, parts, blocks)
    if not len(out):
        raise FastsimError(f"workload: duration_s = {wl.duration_s:g} at these arrival rates gives no request; "
                           "lengthen duration_s or raise the rates" if wl.duration_s is not None else
                           "workload: no requests; give num_requests >= 1")
    return out


def _assemble(wl: C.Workload, parts: list[dict], blocks: dict) -> Workload:
    """Every client's rows in one arrival order, with row references (sessions, next turns,
    sequences) renumbered to it."""
    sizes = [p["t"].size for p in parts]
    base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    t = np.concatenate([p["t"] for p in parts]).astype(np.float64)
    order = np.argsort(t, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    # One client's arrivals (the common case) are already in order: no gathers needed.
    in_order = bool((rank == np.arange(rank.size)).all())

    def column(name, fill, dtype, shift=None):
        """One column in arrival order; `shift` renumbers row references (-1 stays -1)."""
        cols, pooled = [], []
        for j, p in enumerate(parts):
            v = np.asarray(p[name] if name in p else np.full(sizes[j], fill), dtype)
            if shift == "rows":  # a row, or a closed loop's pointer -2 - row
                pooled.append(v <= -2)
                v = np.where(v <= -2, -2 - v, v)
                v = np.where(v >= 0, v + base[j], -1)
            cols.append(v)
        out = np.concatenate(cols) if cols else np.zeros(0, dtype)
        if shift == "rows" and not in_order:
            out = np.where(out >= 0, rank[np.maximum(out, 0)], -1)
        if shift == "rows":
            out = np.where(np.concatenate(pooled), -2 - out, out) if pooled else out
        return out if in_order else out[order]

    # Sessions numbered across clients; a request without one is its own token sequence.
    session_parts, n_sess = [], 0
    for j, p in enumerate(parts):
        s = np.asarray(p.get("session", np.full(sizes[j], -1)), np.int64)
        session_parts.append(np.where(s >= 0, s + n_sess, -1))
        n_sess += int(s.max()) + 1 if s.size and s.max() >= 0 else 0
    session = np.concatenate(session_parts)[order] if session_parts else np.zeros(0, np.int64)
    seq = column("seq_id", -1, np.int64, "rows")
    seq = np.where(seq >= 0, seq, np.arange(order.size))
    offsets, ids, block_tokens = _merge_blocks(parts, blocks, order)
    client = column("client", 0, np.int32)
    return Workload(t[order], column("prompt", 0, np.int64), column("output", 0, np.int64), client,
                    tuple(c.name for c in wl.clients), offsets, ids, block_tokens,
                    session=session, turn=column("turn", 0, np.int64), next_turn=column("next_turn", -1, np.int64, "rows"),
                    think_s=column("think_s", -1.0, np.float64), seq_id=seq,
                    shared_tokens=column("shared_tokens", 0, np.int64), shared_id=client.astype(np.int64))


def _merge_blocks(parts: list, blocks: dict, order: np.ndarray):
    """Every request's block ids in arrival order (none for clients without), one block size."""
    sizes = {b[2] for b in blocks.values()}
    if len(sizes) > 1:
        raise FastsimError(f"workload: traces with different block sizes ({sorted(sizes)}) cannot share a cache")
    n = order.size
    if not blocks:
        return np.zeros(n + 1, np.int64), np.zeros(0, np.int64), 0
    lens = np.concatenate([np.diff(blocks[i][0]) if i in blocks else np.zeros(p["t"].size, np.int64)
                           for i, p in enumerate(parts)])
    ids = np.concatenate([blocks[i][1] for i in sorted(blocks)]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])  # where each request's ids start, client order
    new_lens = lens[order]
    offsets = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], new_lens)
    return offsets, ids[np.repeat(starts[order], new_lens) + within], sizes.pop()
