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


class Requests(NamedTuple):
    """Per request (indexed like run_cluster_nb's inputs, in arrival order), inputs and results."""

    arrival: np.ndarray      # when it arrives (a later turn: set when its previous turn finishes)
    think_s: np.ndarray      # >= 0: a later turn, arriving this long after the previous one finishes
    rejected: np.ndarray     # bool: never scheduled
    session: np.ndarray      # conversation (-1: none), for session affinity
    draw: np.ndarray         # a pre-drawn replica, for random routing
    prompt: np.ndarray
    output: np.ndarray
    measured: np.ndarray     # bool: its gaps feed the ITL statistics
    last_tok: np.ndarray     # time of its last token (written back when it leaves its slot)
    max_itl: np.ndarray
    generated: np.ndarray
    preempts: np.ndarray
    status: np.ndarray       # int8, enums.PENDING ...
    first_sched: np.ndarray
    first_tok: np.ndarray
    finish: np.ndarray
    replica: np.ndarray      # int32, -1: not routed yet
    cached: np.ndarray       # prompt tokens found in the prefix cache when first scheduled
    q_next: np.ndarray       # the next request in its replica's waiting queue (-1: the tail)
    lpm_memo: np.ndarray     # [i, 3]: SGLang's longest-prefix-first, its last match (hits, key, evictions then)
    gen0: np.ndarray         # tokens generated before it arrived (a disaggregated decode pool's first)


class Replicas(NamedTuple):
    """Per replica, its scheduler's state and what it counts."""

    n_running: np.ndarray
    free: np.ndarray             # free KV blocks
    q_head: np.ndarray           # the waiting queue, a linked list through Requests.q_next
    q_tail: np.ndarray
    n_waiting: np.ndarray
    outstanding: np.ndarray      # requests routed to it and not finished (routers read it)
    stage_free: np.ndarray       # [r, stage]: when the pipeline stage is next free
    fl_end: np.ndarray           # [r, i]: batches in flight, a FIFO ring: their ends ...
    fl_id: np.ndarray            # ... and batch numbers
    fl_head: np.ndarray
    fl_count: np.ndarray
    batch_seq: np.ndarray        # the next batch's number
    nt_ratio: np.ndarray         # SGLang's new_token_ratio
    hit_bufs: np.ndarray         # [r, j]: its last prefix-cache lookup
    session_replica: np.ndarray  # per session (not per replica): where session affinity sends it
    tree: np.ndarray             # next decision time per replica, a tournament tree (INF: idle)
    steps_left: np.ndarray       # vLLM V0 multi-step: steps its decode batch still runs without scheduling
    rep_iters: np.ndarray
    rep_peak: np.ndarray         # peak KV blocks used
    rep_preempts: np.ndarray
    rep_requests: np.ndarray
    rep_stretched: np.ndarray    # iterations advanced in steady decode stretches
    rep_time: np.ndarray         # [r, 2]: GPU-seconds of forward passes [compute, communication]


class Turns(NamedTuple):
    """Conversations' later turns and closed loops' next requests, due as earlier ones finish."""

    next_turn: np.ndarray    # the request that follows this one (-1: none; <= -2: a closed loop's)
    think_s: np.ndarray
    arrival: np.ndarray      # Requests.arrival (the same array)
    h_t: np.ndarray          # [0, i]: a heap of due arrivals: times ...
    h_i: np.ndarray          # ... and requests
    h_n: np.ndarray          # its size
    rejected: np.ndarray


class ItlAcc(NamedTuple):
    """Measured requests' inter-token gaps, accumulated as they come."""

    hist: np.ndarray   # enums.ITL_BINS counts
    stats: np.ndarray  # [count, sum, sum of squares]


class Tables(NamedTuple):
    """Every replica's per-stage time by token count and by sequence count (cost_nb's tables), at
    offsets enums.RI_TOK_OFF / RI_SEQ_OFF of its settings row."""

    tok: np.ndarray
    seq: np.ndarray


class Routing(NamedTuple):
    """The router (enums.ROUTE_*) and, under stateless routing, every request's replica up front."""

    policy: int
    params: np.ndarray     # prefix_aware's and kv_aware's thresholds, enums.RP_*
    dest: np.ndarray       # per request: its replica (-1: routed on arrival)
    next_same: np.ndarray  # per request: the next request routed to the same replica
    own_next: np.ndarray   # per replica: its next request still to arrive


class Scratch(NamedTuple):
    """Working arrays, reused by whichever step needs them (no allocation inside the event loop)."""

    slot_a: np.ndarray     # int, one per slot
    slot_b: np.ndarray     # int, one per slot
    slot_f: np.ndarray     # float, one per slot
    phase_a: np.ndarray    # int, one per block phase (block_size + 1)
    phase_b: np.ndarray
    phase_c: np.ndarray
    pipeline: tuple        # pipeline_nb.PipelineScratch


class TimelineOut(NamedTuple):
    """Where a decode stretch writes its timeline rows."""

    timeline: np.ndarray
    loop_state: np.ndarray  # [enums.LS_ROWS]: rows written
    record: bool


class Batch(NamedTuple):
    """One iteration's batch as the cost model sees it: sums over its requests."""

    n_decodes: int
    decode_kv_tokens: float    # keys the decodes attend over (each its context + 1, within a window)
    n_prefills: int            # prefill chunks
    prefill_tokens: int
    prefill_pairs: float       # query-key pairs of the chunks' causal attention
    prefill_kv_tokens: float   # keys the chunks attend over


EMPTY_BATCH = Batch(0, 0.0, 0, 0, 0.0, 0.0)
