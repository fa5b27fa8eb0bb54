"""The engine's state and results as named bundles: NamedTuples of arrays, which Numba compiles like
plain tuples (the same layout, no cost), read by field name in the kernels and by their callers."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Per replica, what a run did (KernelOut.per_replica).
REPLICA_STATS = np.dtype([
    ("iterations", np.int64),
    ("peak_kv_blocks_used", np.int64),
    ("free_blocks_at_end", np.int64),
    ("preemptions", np.int64),
    ("requests", np.int64),
    ("stretched_iterations", np.int64),      # iterations advanced in steady decode stretches
    ("prefix_cache_evictions", np.int64),
    ("prefix_cache_hit_tokens", np.int64),   # prompt tokens served from the prefix cache
    ("lazy_exits", np.int64),                # times fast mode's lazy form went back to exact form to decide
    ("closed_form_iterations", np.int64),    # iterations fast mode summed in closed form
    ("compute_time_s", np.float64),          # GPU-seconds of forward passes, communication apart
    ("comm_time_s", np.float64),             # ... and of tensor-parallel communication
])


class KernelOut(NamedTuple):
    """What run_cluster_nb returns: per request (indexed like its inputs), then per run."""

    status: np.ndarray             # int8, enums.FINISHED ...
    first_scheduled_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    generated: np.ndarray          # output tokens made
    preemptions: np.ndarray
    max_itl_s: np.ndarray
    replica: np.ndarray            # int32, -1: never scheduled
    cached_tokens: np.ndarray      # prompt tokens found in the prefix cache when first scheduled
    arrival_s: np.ndarray          # later turns of conversations arrive when the run says
    itl_hist: np.ndarray           # enums.ITL_BINS counts of measured requests' gaps
    itl_stats: np.ndarray          # [count, sum, sum of squares] of the same gaps
    timeline: np.ndarray           # a row per iteration, columns enums.TL_*, by start time
    per_replica: np.ndarray        # REPLICA_STATS, a record per replica


class Slots(NamedTuple):
    """The running requests' hot state, [replica, slot]: slots 0..n_running-1 of a replica's row hold
    its running requests in admission order (an iteration walks a few contiguous cache lines; a
    request's per-request entries are written back when it leaves its slot)."""

    req: np.ndarray        # the request in the slot
    prompt: np.ndarray
    tokens: np.ndarray     # prompt + generated
    computed: np.ndarray   # KV computed or being computed
    output: np.ndarray
    blocks: np.ndarray     # KV blocks held
    last: np.ndarray       # time of the last token
    max_itl: np.ndarray
    measured: np.ndarray   # bool: its gaps feed the ITL statistics
    sample: np.ndarray     # the batch whose completion samples its next token, or -1
