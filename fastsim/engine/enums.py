"""Integer codes used inside kernels, and their names for the output table."""
from __future__ import annotations

from fastsim.policies import ROUTERS

# Request status
PENDING = 0      # not yet arrived, or waiting: never final
RUNNING = 1      # never final
FINISHED = 2
REJECTED = 3
UNFINISHED = 4   # the simulation ended (time limit, or no progress possible) before it did

STATUS_NAMES = {PENDING: "unfinished", RUNNING: "unfinished", FINISHED: "finished",
                REJECTED: "rejected", UNFINISHED: "unfinished"}

# Why a request was rejected
REASON_NONE = 0
REASON_CONTEXT = 1   # prompt + output longer than max_model_len
REASON_KV = 2        # needs more KV blocks than the whole cache holds
REASON_NAMES = {REASON_NONE: "", REASON_CONTEXT: "longer than max_model_len",
                REASON_KV: "needs more KV blocks than the cache holds"}

# Columns of the per-iteration timeline
TL_START_S = 0
TL_DURATION_S = 1
TL_NUM_SEQS = 2
TL_NUM_TOKENS = 3
TL_PREFILL_TOKENS = 4
TL_NUM_DECODES = 5
TL_KV_BLOCKS_USED = 6
TL_NUM_WAITING = 7
TL_NUM_RUNNING = 8
TL_PREEMPTIONS = 9
TL_REPLICA = 10
TL_COLUMNS = ("start_s", "duration_s", "num_seqs", "num_tokens", "prefill_tokens", "num_decodes",
              "kv_blocks_used", "num_waiting", "num_running", "preemptions", "replica")

# cluster_nb's loop_state, the event loop's state between calls: [requests left, next arrival,
# router turn, timeline rows written]; the last is also read by the stretches that write rows
LS_ROWS = 3

# Columns of the per-replica integer configuration (rows of rep_int)
RI_MAX_SEQS = 0
RI_MAX_TOKENS = 1
RI_BLOCK_SIZE = 2
RI_NUM_BLOCKS = 3
RI_CHUNKED = 4
RI_THRESHOLD = 5
RI_V0 = 6
RI_STAGES = 7        # pipeline_parallel_size
RI_WINDOW = 8        # sliding window of the model (0: none)
RI_TOK_OFF = 9       # offset of this replica's table in the concatenated token-count table
RI_SEQ_OFF = 10      # ... and in the sequence-count table
RI_APC = 11          # enable_prefix_caching
RI_SGLANG = 12       # framework: sglang (prefill batches apart from decode batches, reserved decode room)
RI_LPM = 13          # schedule_policy: lpm (SGLang: the waiting request with the longest cached prefix first)
RI_NO_EVICT = 14     # TensorRT-LLM GUARANTEED_NO_EVICT: admit only if every admitted request can reach prompt + output
RI_SCHED_STEPS = 15  # vLLM V0's num_scheduler_steps: a decode batch runs this many steps per scheduling
N_RI = 16

# SGLang's admission reserve: each running request's remaining output (clipped) times a ratio that
# starts at 0.7, decays to 0.1 over 600 decode steps and is reset by a retraction
SGL_CLIP_MAX_NEW_TOKENS = 4096
SGL_INIT_NEW_TOKEN_RATIO = 0.7
SGL_MIN_NEW_TOKEN_RATIO = 0.1
SGL_NEW_TOKEN_RATIO_DECAY = (0.7 - 0.1) / 600
SGL_LPM_MAX_QUEUE = 128  # a longer queue is served first-come-first-served

# Router policies
ROUTE_ROUND_ROBIN = 0
ROUTE_RANDOM = 1
ROUTE_LEAST_REQUESTS = 2
ROUTE_LEAST_KV = 3
ROUTE_SESSION_AFFINITY = 4
ROUTE_PREFIX_AWARE = 5
ROUTE_KV_AWARE = 6
ROUTE_NAMES = {name: i for i, name in enumerate(ROUTERS)}  # the config's names, numbered in their order
assert [ROUTE_NAMES[n] for n in ROUTERS] == [ROUTE_ROUND_ROBIN, ROUTE_RANDOM, ROUTE_LEAST_REQUESTS, ROUTE_LEAST_KV,
                                             ROUTE_SESSION_AFFINITY, ROUTE_PREFIX_AWARE, ROUTE_KV_AWARE]
# prefix_aware's parameters (route_params), named as SGLang's router names them
RP_CACHE_THRESHOLD = 0
RP_BALANCE_ABS = 1
RP_BALANCE_REL = 2
RP_OVERLAP_WEIGHT = 3  # kv_aware: weight of the blocks to prefill against the blocks in use
N_RP = 4

# ITL histogram: each octave of [ITL_MIN_S, ITL_MAX_S) in 2^ITL_OCTAVE_BITS equal bins, so that a
# gap's bin is its float's exponent and leading mantissa bits (no logarithm on the engine's hot path);
# percentiles are exact to a bin: 0.1% of the value or better. Gaps outside the range go to the end bins.
ITL_OCTAVE_BITS = 10
ITL_MIN_EXP = -20  # ITL_MIN_S = 2^-20 s, about 1 us
ITL_OCTAVES = 34   # up to 2^14 s, about 4.5 hours
ITL_MIN_S = 2.0 ** ITL_MIN_EXP
ITL_MAX_S = 2.0 ** (ITL_MIN_EXP + ITL_OCTAVES)
ITL_BINS = ITL_OCTAVES << ITL_OCTAVE_BITS
