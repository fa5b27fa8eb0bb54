"""How much of a trace's prompts an unbounded prefix cache could serve: the reference figure a
simulated cache (finite, block-granular) is compared with."""
from __future__ import annotations

import numpy as np

from fastsim.workload.traces import TraceRows


def unbounded_prefix_hits(rows: TraceRows) -> np.ndarray:
    """Per request, in order: prompt tokens covered by the longest run of its leading block ids
    that some earlier request also had (x the trace's block size, capped at the prompt length).

    Mooncake's ids are prefix-consistent (equal id = equal content and equal prefix), so a leading
    run of known ids is a reusable prefix.
    """
    if rows.hash_offsets is None:
        return np.zeros(len(rows), np.int64)
    seen: set[int] = set()
    hits = np.zeros(len(rows), np.int64)
    for i in range(len(rows)):
        ids = rows.hash_ids[rows.hash_offsets[i]:rows.hash_offsets[i + 1]].tolist()
        run = 0
        while run < len(ids) and ids[run] in seen:
            run += 1
        hits[i] = min(run * rows.hash_block_tokens, rows.prompt_tokens[i])
        seen.update(ids)
    return hits


def unbounded_prefix_hit_rate(rows: TraceRows) -> float:
    """Fraction of all prompt tokens an unbounded cache serves."""
    total = rows.prompt_tokens.sum()
    return float(unbounded_prefix_hits(rows).sum() / total) if total else 0.0
