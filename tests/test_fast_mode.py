"""Fast mode (simulation.mode: fast) against exact mode, and its closed forms against step-by-step sums."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastsim.engine import enums as E
from fastsim.engine.bundles import Batch, ItlAcc
from fastsim.engine import closed_form_nb as cf
from fastsim.engine import lazy_nb as lz
from fastsim.engine.batch_nb import ceil_div_pow2_nb, div_pow2_nb, itl_bin_low_nb, itl_bin_nb, mod_pow2_nb
from fastsim.config import SpeculativeConfig
from fastsim.cost.speculative import speculative_cost_model
from fastsim.engine.cost_nb import (LAYERS, OVERLAP, SPEC_DRAFT_ATTN, SPEC_EXPECTED, SPEC_TOKENS, attention_time_nb,
                                    decode_only_nb, stage_time_nb, verify_attention_time_nb)
from fastsim.metrics import itl_bin_edges_s
from test_engine import CM, CPU_TERMS, _fits, assert_same_stats, engines, long_run, preloaded, run, windowed


def step_attention(p, n, keys0, grow, k):
    """Reference: the attention time of each of k iterations, one by one, the keys growing by `grow`
    a step (n without a sliding window; fewer once some decoders read the whole window; with
    speculation: 1/E of the verification's and the drafter's)."""
    if p[SPEC_TOKENS] == 0.0:
        return [p[LAYERS] * attention_time_nb(p, n, float(keys0 + grow * u), 0, 0.0, 0.0, 0) for u in range(k)]
    q, draft = p[SPEC_TOKENS] + 1.0, p[SPEC_TOKENS] * p[SPEC_DRAFT_ATTN]
    return [p[LAYERS] * (verify_attention_time_nb(p, n, float(keys0 + grow * u), q)
                         + draft * attention_time_nb(p, n, float(keys0 + grow * u), 0, 0.0, 0.0, 0))
            / p[SPEC_EXPECTED] for u in range(k)]


# Speculative decoding: n-gram drafts (no drafter on the GPU) and a drafter with a KV cache of its own.
SPECS = [None, SpeculativeConfig(method="ngram", num_speculative_tokens=4, acceptance_rate=0.8),
         SpeculativeConfig(method="eagle", num_speculative_tokens=3, acceptance_probs=[0.9, 0.7, 0.5])]
TABLES = [speculative_cost_model(CM, sc, 256, 8192, 0.3e-3) for sc in SPECS]


@given(n=st.integers(1, 256), keys=st.integers(1, 2_000_000), overlap=st.sampled_from([4.0, 2.5]),
       spec=st.sampled_from(range(len(SPECS))))
def test_run_iteration_is_the_cost_models_to_rounding(n, keys, overlap, spec):
    """A decode-only iteration as the closed-form runs split it (the rest, attention) against
    stage_time_nb, with and without speculation."""
    p, tok, seq = (a.copy() for a in TABLES[spec])
    p[OVERLAP] = overlap
    body, head = stage_time_nb(p, tok, seq, 0, 0, Batch(n, float(keys), 0, 0, 0.0, 0.0))
    rest, comm = decode_only_nb(p, tok, seq, 0, 0, n)
    attention = cf.attention_nb(cf.attention_coefs_nb(p), n, float(keys))
    assert rest + attention == pytest.approx(body + head, rel=1e-14)
    assert comm == tok[1, n] + seq[1, n]
    if SPECS[spec] is None:  # one formula: bit for bit
        assert attention == p[LAYERS] * attention_time_nb(p, n, float(keys), 0, 0.0, 0.0, 0)


@given(n=st.integers(1, 256), keys0=st.integers(1, 2_000_000), k=st.integers(1, 3000),
       spec=st.sampled_from(range(len(SPECS))), capped=st.one_of(st.just(0), st.integers(0, 256)))
def test_closed_form_sum_of_iterations_matches_stepping(n, keys0, k, spec, capped):
    grow = n - min(capped, n)  # decoders whose keys still grow (the others read a whole window)
    N = k - 1
    p = TABLES[spec][0]
    c = cf.attention_coefs_nb(p)
    g0 = cf.attention_nb(c, n, float(keys0))
    a1, a2, ok = cf.fit_nb(c, n, float(keys0), grow, g0, N)
    while not ok:  # as the engine does: a run the quadratic does not fit is cut in half
        N //= 2
        a1, a2, ok = cf.fit_nb(c, n, float(keys0), grow, g0, N)
    k = N + 1
    want = step_attention(p, n, keys0, grow, k)
    p0, p1, p2, p3, p4 = cf.power_sums_nb(k - 1)
    assert (p0, p1, p2, p3, p4) == pytest.approx([sum(u ** m for u in range(k)) for m in range(5)], rel=1e-15)
    assert g0 * p0 + a1 * p1 + a2 * p2 == pytest.approx(math.fsum(want), rel=1e-12)
    b0 = 1e-3 + g0  # a gap: some constant plus the attention
    s2 = b0 * b0 * p0 + 2 * b0 * a1 * p1 + (a1 * a1 + 2 * b0 * a2) * p2 + 2 * a1 * a2 * p3 + a2 * a2 * p4
    assert s2 == pytest.approx(math.fsum((1e-3 + g) ** 2 for g in want), rel=1e-12)
    for u in (0, k // 3, k - 1):
        assert g0 + a1 * u + a2 * u * u == pytest.approx(want[u], rel=1e-12)


def reference_bin(x):
    """The ITL bin from the definition: octaves of 2^ITL_OCTAVE_BITS equal bins from ITL_MIN_S."""
    if x <= 0:
        return 0
    m, e = math.frexp(x)  # x = (2m) 2^(e-1), 2m in [1, 2)
    b = (e - 1 - E.ITL_MIN_EXP) * (1 << E.ITL_OCTAVE_BITS) + int((2 * m - 1) * (1 << E.ITL_OCTAVE_BITS))
    return min(max(b, 0), E.ITL_BINS - 1)


@given(b0=st.one_of(st.floats(1e-4, 1.0), st.sampled_from([0.0, 2.0 ** -21, 0.0625, 2.0 ** 14])),
       slope=st.one_of(st.floats(0, 1e-4), st.just(0.0), st.floats(0, 1.0)),
       a2=st.one_of(st.just(0.0), st.floats(0, 1e-7), st.floats(0, 1e-3)),
       k=st.integers(1, 500), count=st.integers(1, 5))
def test_binning_a_run_of_gaps_matches_binning_each(b0, slope, a2, k, count):
    """Bins found by solving for their edges are those of each gap alone, out to the clamped ends
    (gaps from below ITL_MIN_S to above ITL_MAX_S), whether a run crosses no edge or hundreds."""
    hist = np.zeros(E.ITL_BINS, np.int64)
    cf.bin_run_nb(ItlAcc(hist, np.zeros(3)), b0, slope, a2, k, count)
    want = np.zeros(E.ITL_BINS, np.int64)
    for u in range(k):
        want[reference_bin(b0 + slope * u + a2 * u * u)] += count
    np.testing.assert_array_equal(hist, want)


@given(i=st.integers(1, E.ITL_BINS - 1))
def test_a_bins_low_edge_is_the_smallest_gap_in_it(i):
    x = itl_bin_low_nb(i)
    assert x == itl_bin_edges_s()[i]
    assert itl_bin_nb(x) == i and itl_bin_nb(math.nextafter(x, 0.0)) == i - 1


@given(x=st.one_of(st.floats(-1e6, 1e6), st.sampled_from([E.ITL_MIN_S, E.ITL_MAX_S, 1.0, 0.5, 2.0 ** -30, 1e30, 0.0,
                                                            -0.0, -1e-300, -1e30])))
def test_itl_bin_is_the_octave_and_leading_mantissa_bits(x):
    b = itl_bin_nb(x)
    assert b == reference_bin(x)
    edges = itl_bin_edges_s()
    if E.ITL_MIN_S <= x < E.ITL_MAX_S:  # inside the range the bin brackets the value, within 0.1%
        assert edges[b] <= x < edges[b + 1]
        assert edges[b + 1] / edges[b] - 1 <= 2.0 ** -E.ITL_OCTAVE_BITS


@given(a=st.integers(-10**12, 10**12), shift=st.integers(0, 8))
def test_block_arithmetic_by_shifts_is_pythons(a, shift):
    bs = 1 << shift
    assert (ceil_div_pow2_nb(a, bs), div_pow2_nb(a, bs), mod_pow2_nb(a, bs)) == (-(-a // bs), a // bs, a % bs)


@given(b0=st.floats(1e-3, 0.1), slope=st.floats(-1 / 400, 0.01), a2=st.floats(0, 1e-5), kmax=st.integers(0, 200),
       total=st.integers(0, 2), t=st.floats(0, 100),
       to_arrival=st.one_of(st.just(math.inf), st.floats(-1.0, 30.0)),
       to_limit=st.one_of(st.just(math.inf), st.floats(-1.0, 30.0)))
def test_iterations_a_run_takes_are_the_last_that_runs(b0, slope, a2, kmax, total, t, to_arrival, to_limit):
    """The search from (time left) / b0 against trying every iteration in turn. A negative slope
    makes gaps shorter than b0 (down to b0 / 2 at u = 200): the start is then low and it steps up."""
    a1 = slope * b0
    t_arrival, max_time_s = t + to_arrival, t + to_limit
    last = 0
    for j in range(1, kmax + 1):  # reference: iterations run while each runs
        if not cf.runs_nb(t, b0, a1, a2, j, total, t_arrival, max_time_s):
            break
        last = j
    assert cf.last_run_nb(t, b0, a1, a2, kmax, total, t_arrival, max_time_s) == last


@given(phase=st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]).flatmap(  # powers of two; <= 32 masks, above loops
           lambda bs: st.lists(st.integers(0, 5), min_size=bs, max_size=bs)).map(np.array),
       D=st.integers(0, 1000), free=st.integers(0, 300), kmax=st.integers(0, 200))
def test_blocks_taken_over_a_run_match_counting_each_iteration(phase, D, free, kmax):
    bs, n = phase.size, int(phase.sum())
    ph = phase.reshape(1, -1)
    used, fit = 0, 0
    for j in range(kmax):  # reference: iteration by iteration
        if used + phase[(D + j) % bs] > free:
            break
        used += phase[(D + j) % bs]
        fit = j + 1
    assert cf.blocks_fit_nb(ph, 0, D, bs, n, free, kmax) == fit
    assert cf.blocks_used_nb(ph, 0, D, bs, n, fit) == used


def compare(a, b, batch):
    """Fast (a) and exact (b) runs: the same decisions, times equal to rounding."""
    for key in ("status", "generated", "preemptions", "replica", "cached_tokens"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    for key in ("first_scheduled_s", "first_token_s", "finish_s", "arrival_s", "max_itl_s"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-9, atol=1e-12, err_msg=key)
    assert_same_stats(a, b, "iterations", "peak_kv_blocks_used", "free_blocks_at_end", "preemptions", "requests")
    assert_same_stats(a, b, "prefix_cache_evictions", "prefix_cache_hit_tokens")  # prefix cache evictions, hits
    assert_same_stats(a, b, "compute_time_s", "comm_time_s", rtol=1e-9)
    np.testing.assert_allclose(a.itl_stats, b.itl_stats, rtol=1e-9)
    # A gap within rounding of a bin edge may land in the next bin: the cumulative counts agree
    # everywhere to within one iteration's tokens (`batch`: the most requests decoding at once).
    ca, cb = np.cumsum(a.itl_hist), np.cumsum(b.itl_hist)
    assert ca[-1] == cb[-1]
    assert np.abs(ca - cb).max() <= batch
    # Timeline rows (with output.timeline): the same iterations, replica by replica (across
    # replicas, starts equal in one mode may differ by rounding in the other).
    ta, tb = (t[np.lexsort((t[:, E.TL_START_S], t[:, E.TL_REPLICA]))] for t in (a.timeline, b.timeline))
    assert ta.shape == tb.shape
    np.testing.assert_array_equal(ta[:, E.TL_NUM_SEQS:], tb[:, E.TL_NUM_SEQS:])
    np.testing.assert_allclose(ta[:, :E.TL_NUM_SEQS], tb[:, :E.TL_NUM_SEQS], rtol=1e-9, atol=1e-12)


@given(wl=st.integers(1, 40).flatmap(lambda n: st.tuples(
           st.lists(st.floats(0, 3, allow_nan=False), min_size=n, max_size=n),
           st.lists(st.integers(1, 300), min_size=n, max_size=n),
           st.lists(st.integers(1, 60), min_size=n, max_size=n),
           st.lists(st.sampled_from([-1.0, -1.0, 0.0, 0.05]), min_size=n, max_size=n))),
       e=engines, replicas=st.integers(1, 3), caching=st.booleans(), max_time=st.sampled_from([np.inf, 1.5]),
       policy=st.sampled_from([E.ROUTE_ROUND_ROBIN, E.ROUTE_RANDOM, E.ROUTE_LEAST_REQUESTS, E.ROUTE_LEAST_KV,
                               E.ROUTE_PREFIX_AWARE, E.ROUTE_KV_AWARE]),
       system_prompt=st.sampled_from([0, 0, 24, 100]), spec=st.sampled_from([0, 0, 1, 2]),
       sliding=st.sampled_from([0, 0, 40, 300]), timeline=st.sampled_from([False, False, True]), cpu=CPU_TERMS)
def test_fast_mode_gives_exact_modes_results(wl, e, replicas, caching, max_time, policy, system_prompt, spec,
                                              sliding, timeline, cpu):
    """Random workloads through both modes: chunked prefill, long-prefill thresholds, preemptions
    (small caches), conversations (a request's next turn after a think time), 1-3 replicas, six
    routers (two read the replicas' prefix caches), a time limit, V0 (which fast mode steps as exact
    mode), prefix caching with shared content (a system prompt, and the turns of a conversation
    sharing their tokens), speculative decoding, a sliding window (Mistral-7B's, cut short so that
    decodes reach it), and the timeline (a row per iteration, summed ones too; exact mode then
    schedules every iteration in full)."""
    arrivals, prompts, outputs, think = wl
    kept = _fits(prompts, outputs, e)
    if not kept:
        return
    n = len(kept)
    arrivals = sorted(arrivals)[:n]
    prompts, outputs = [k[0] for k in kept], [k[1] * 4 for k in kept]
    nxt = [i + 1 if i + 1 < n and think[i + 1] >= 0 else -1 for i in range(n)]
    # Think times made distinct: an arrival at the very instant another request finishes is a tie
    # that rounding decides (closed-form sums and step-by-step sums differ in the last bits).
    think_s = [think[i] + 1e-6 * i if i > 0 and nxt[i - 1] == i else -1.0 for i in range(n)]
    kw = dict(max_num_seqs=e["max_num_seqs"], max_num_batched_tokens=e["max_num_batched_tokens"],
              block_size=e["block_size"], num_blocks=e["num_blocks"] * 4, chunked=e["chunked"],
              threshold=e["threshold"], v0=e["v0"] and not caching, timeline=timeline, replicas=replicas,
              policy=policy, max_time_s=max_time, prefix_caching=caching, turns=(nxt, think_s),
              no_evict=e["no_evict"] and not caching, spec=SPECS[spec], cm=windowed(sliding) if sliding else CM,
              cpu=cpu, steps=e["steps"])
    kw["kv0"] = preloaded(arrivals, outputs, not caching and n % 2 == 0)
    if caching:
        seq = list(range(n))
        for i in range(n):
            if nxt[i] >= 0:
                seq[nxt[i]] = seq[i]
        kw["content"] = {"seq_id": np.array(seq, np.int64), "shared_tokens": np.full(n, system_prompt, np.int64),
                         "shared_id": np.zeros(n, np.int64), "session": np.array(seq, np.int64)}
    compare(run(arrivals, prompts, outputs, fast=True, **kw), run(arrivals, prompts, outputs, fast=False, **kw),
            e["max_num_seqs"] * replicas)


@pytest.mark.parametrize("spec, sliding", [(0, 0), (1, 0), (2, 0), (0, 1000), (2, 1000)])
def test_fast_mode_sums_most_iterations_and_stays_exact_on_a_long_run_with_preemptions(spec, sliding):
    """Without speculation, and with it (each iteration 1/E of a speculative step); with a sliding
    window of 1,000 tokens, which most decoders reach (contexts of 60 to 2,800 tokens)."""
    arrivals, prompts, outputs = long_run(400)
    kw = dict(timeline=False, num_blocks=1000, spec=SPECS[spec], cm=windowed(sliding) if sliding else CM)
    a = run(arrivals, prompts, outputs, fast=True, **kw)
    b = run(arrivals, prompts, outputs, fast=False, **kw)
    compare(a, b, 256)
    assert b.preemptions.sum() > 0
    assert a.per_replica["lazy_exits"] == 0  # every preemption decided in lazy form, none by going back to exact form
    assert a.per_replica["closed_form_iterations"] > 0.8 * a.per_replica["iterations"]  # iterations summed in closed form


@pytest.mark.parametrize("shared", ["none", "system prompt", "turns", "sequences"])
def test_prefix_caching_in_lazy_form_matches_exact_mode(shared):
    """A long run with prefix caching on a cache that runs out (evictions, preemptions): nothing
    shared (every block private), a 64-token system prompt shared by all, pairs of requests as two
    turns of one conversation (the second arrives 10 ms after the first finishes: all their blocks
    shared), or pairs sharing a token sequence while both run (no workload makes these; the
    cache's worst case). Fast mode matches exact mode request by request, evictions and hits
    included, and sums most iterations in closed form, a turn's too: its answer is shared with the
    next turn only, which arrives after it finishes, so its blocks are named then and it decodes
    lazily. A request whose answer another one may look up while it decodes (sequences) keeps the
    replica in exact form, where the decode stretch steps most iterations in O(1): in lazy form
    every iteration would be scheduled in full (3x slower than exact mode on a chat workload
    once)."""
    arrivals, prompts, outputs = long_run(400)
    n = len(prompts)
    seq = np.arange(n) // 2 if shared in ("turns", "sequences") else np.arange(n)
    content = {"seq_id": seq.astype(np.int64), "shared_tokens": np.full(n, 64 if shared == "system prompt" else 0),
               "shared_id": np.zeros(n, np.int64)}
    kw = dict(timeline=False, num_blocks=1000, prefix_caching=True, content=content)
    if shared == "turns":
        prompts = [prompts[i] + (prompts[i - 1] + outputs[i - 1] if i % 2 else 0) for i in range(n)]
        content["session"] = content["seq_id"]
        kw["turns"] = ([i + 1 if i % 2 == 0 and i + 1 < n else -1 for i in range(n)],
                       [0.01 if i % 2 else -1.0 for i in range(n)])
    a = run(arrivals, prompts, outputs, fast=True, **kw)
    b = run(arrivals, prompts, outputs, fast=False, **kw)
    compare(a, b, 256)
    assert b.preemptions.sum() > 0 and b.per_replica["prefix_cache_evictions"] > 0
    assert b.per_replica["prefix_cache_hit_tokens"] > 0  # tokens found in the cache (a preempted request's own, at least)
    if shared != "sequences":
        assert a.per_replica["closed_form_iterations"] > 0.8 * a.per_replica["iterations"]
    assert a.per_replica["stretched_iterations"] > 0.8 * a.per_replica["iterations"]  # in closed form or in exact form's O(1) steps


@pytest.mark.parametrize("policy", [E.ROUTE_PREFIX_AWARE, E.ROUTE_KV_AWARE, E.ROUTE_LEAST_KV])
def test_a_lone_replica_behind_a_router_that_reads_state_is_still_summed(policy):
    """One replica behind a router that reads the replicas' caches or load (Dynamo on one GPU):
    every request goes to it whatever the router reads, so fast mode holds it lazily."""
    arrivals, prompts, outputs = long_run(300)
    n = len(prompts)
    content = {"seq_id": np.arange(n, dtype=np.int64), "shared_tokens": np.full(n, 64),
               "shared_id": np.zeros(n, np.int64)}
    kw = dict(timeline=False, num_blocks=1000, prefix_caching=True, content=content, policy=policy)
    a = run(arrivals, prompts, outputs, fast=True, **kw)
    b = run(arrivals, prompts, outputs, fast=False, **kw)
    compare(a, b, 256)
    assert (a.replica == 0).all() and b.per_replica["prefix_cache_evictions"] > 0
    assert a.per_replica["closed_form_iterations"] > 0.8 * a.per_replica["iterations"]  # summed in closed form


# Cache sizes at which a router reading the free list before the lazy decoders' pending blocks
# leave it routes differently: without the flush each case fails, kv_aware's by one request.
@pytest.mark.parametrize("policy, num_blocks", [(E.ROUTE_PREFIX_AWARE, 500), (E.ROUTE_KV_AWARE, 300)])
def test_replicas_behind_a_router_that_reads_their_caches_are_summed_and_exact(policy, num_blocks):
    """Three replicas whose prefix caches run out (evictions) behind a router that reads them at
    every arrival (six system prompts of 256 tokens, one per request in turn: where one is cached
    bears on where the next request with it goes): the lazy form's pending blocks leave the free
    list before the router reads it, so routing, hits and evictions are exact mode's, and most
    iterations are still summed."""
    arrivals, prompts, outputs = long_run(600)
    n = len(prompts)
    content = {"seq_id": np.arange(n, dtype=np.int64), "shared_tokens": np.full(n, 256),
               "shared_id": np.arange(n, dtype=np.int64) % 6}
    kw = dict(timeline=False, num_blocks=num_blocks, prefix_caching=True, content=content, policy=policy, replicas=3)
    a = run(arrivals, prompts, outputs, fast=True, **kw)
    b = run(arrivals, prompts, outputs, fast=False, **kw)
    compare(a, b, 3 * 256)
    assert np.bincount(b.replica, minlength=3).min() > n // 10  # the router spreads them
    assert b.per_replica["prefix_cache_evictions"].sum() > 0 and b.per_replica["prefix_cache_hit_tokens"].sum() > 0  # evictions, hits
    assert a.per_replica["closed_form_iterations"].sum() > 0.7 * a.per_replica["iterations"].sum()  # summed in closed form


def test_a_timeline_keeps_fast_mode_summing_and_its_rows_in_order_of_start():
    """Three replicas with output.timeline: the runs summed in closed form write their rows (one
    per iteration, as exact mode's), and the table comes out in order of start, though a summed
    run's rows are written ahead of the other replicas' between."""
    arrivals, prompts, outputs = long_run(400)
    kw = dict(timeline=True, num_blocks=1000, replicas=3, policy=E.ROUTE_LEAST_REQUESTS)
    a = run(arrivals, prompts, outputs, fast=True, **kw)
    b = run(arrivals, prompts, outputs, fast=False, **kw)
    compare(a, b, 3 * 256)
    tl = a.timeline
    assert tl.shape[0] == a.per_replica["iterations"].sum()  # a row per iteration
    assert (np.diff(tl[:, E.TL_START_S]) >= 0).all()
    assert not (np.diff(tl[:, E.TL_REPLICA]) == 0).all()  # replicas interleave
    assert a.per_replica["closed_form_iterations"].sum() > 0.8 * a.per_replica["iterations"].sum()  # summed in closed form


@pytest.mark.parametrize("num_blocks", [100, 130])
def test_a_chunked_prefill_preempted_in_lazy_form_matches_exact_mode(num_blocks):
    """Two decoders grow while a 2,000-token prompt is prefilled in chunks the budget cuts (256
    tokens a step): the cache runs out mid-prefill, and the newest request, that prefill, is
    preempted (with 100 blocks it can never fit, and is preempted until the run ends)."""
    arrivals, prompts, outputs = [0.0, 0.0, 0.5], [100, 100, 2000], [600, 600, 5]
    kw = dict(max_num_batched_tokens=256, num_blocks=num_blocks, timeline=False)
    a = run(arrivals, prompts, outputs, fast=True, **kw)
    b = run(arrivals, prompts, outputs, fast=False, **kw)
    compare(a, b, 256)
    assert b.preemptions[:2].tolist() == [0, 0] and b.preemptions[2] > 10
    assert a.per_replica["lazy_exits"] == 0


def test_without_decoders_to_sum_fast_mode_still_matches():
    """Requests of one output token never decode: every iteration is a scheduled prefill."""
    a = run([0.0, 0.001, 0.002], [100, 5000, 30], [1, 1, 1], fast=True, timeline=False)
    b = run([0.0, 0.001, 0.002], [100, 5000, 30], [1, 1, 1], fast=False, timeline=False)
    compare(a, b, 256)
    assert a.per_replica["closed_form_iterations"] == 0


def test_worst_gap_record_overflowing_is_folded_into_the_requests():
    """A long request decodes while 1,100 one-token requests arrive with shrinking prompts: each
    prefill makes a gap smaller than the last but larger than the decodes' between, so the record of
    falling gaps outgrows its 1,024 entries and is folded into the decoders' own worst gaps."""
    n = 1101
    arrivals = [0.0] + [0.2 * j for j in range(1, n)]
    prompts = [10] + [1500 - j for j in range(1, n)]
    outputs = [40_000] + [1] * (n - 1)
    a = run(arrivals, prompts, outputs, fast=True, timeline=True, num_blocks=20_000)
    b = run(arrivals, prompts, outputs, fast=False, timeline=True, num_blocks=20_000)
    compare(a, b, 256)
    tl = b.timeline
    record = []  # the falling gaps, from exact mode's iterations
    deepest = 0
    for gap in np.diff(tl[:, E.TL_START_S] + tl[:, E.TL_DURATION_S]):
        while record and record[-1] <= gap:
            record.pop()
        record.append(gap)
        deepest = max(deepest, len(record))
    assert deepest > lz.STACK_CAP


@given(st.lists(st.tuples(st.sampled_from(["admit", "admit", "finish", "preempt"]), st.integers(0, 10**6)),
                max_size=300), st.integers(1, 6))
def test_admission_stack_gives_the_newest_running_slot(ops, max_seqs):
    """Admissions, finishes of any running slot and preemptions of the newest, in any order: the
    stack (squeezed whenever its 2 x max_seqs entries fill) names the running slot of the highest
    admission number, as a scan of the slots does."""
    state = lz.lazy_state_nb(1, max_seqs, 16, True)
    cnt, s_seq, s_state = state[0], state[4], state[5]
    seq = 0
    for op, pick in ops:
        running = [k for k in range(max_seqs) if s_state[0, k] != lz.FREE]
        free = [k for k in range(max_seqs) if s_state[0, k] == lz.FREE]
        if op == "admit" and free:
            k = free[pick % len(free)]
            s_state[0, k], s_seq[0, k] = (lz.LAZY, lz.EXPLICIT)[pick % 2], seq
            seq += 1
            lz._order_push(state, 0, k)
        elif op == "finish" and running:
            s_state[0, running[pick % len(running)]] = lz.FREE
        elif op == "preempt" and running:
            newest = max(running, key=lambda k: s_seq[0, k])
            assert lz._order_pop_newest(state, 0) == newest
            s_state[0, newest] = lz.FREE
        assert cnt[0, lz.C_ORDN] <= 2 * max_seqs
