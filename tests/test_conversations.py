"""Conversations in the engine: later turns arrive after the previous answer plus a think time,
their prompts extend the previous turn's tokens, and prefix caching serves what they share."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from fastsim.engine import enums as E
from fastsim.engine import prefix_nb as px
from fastsim.workload import BlockSources
from test_engine import CM, OVERHEAD, assert_same_stats, fwd, run


def build(sessions, system_prompt=0, jitter=False):
    """Rows of conversations as the workload lays them out (session by session): arrival (NaN for
    later turns), prompt, output, next turn, think time, and each row's token sequence (its
    session's first row) and session.

    jitter: each positive think time made unique by less than a microsecond, for a test against the
    reference. Its times differ from the engine's by rounding, so two turns due at one instant by
    different paths (alike turns of two sessions, one thinking while the other was served) can
    arrive in either order. A zero think time stays: that turn arrives at its previous turn's
    finish exactly, in both."""
    jitter_rng = np.random.default_rng(0)
    arrivals, prompts, outputs, next_turn, think, seq, session = [], [], [], [], [], [], []
    for number, (start, turns) in enumerate(sorted(sessions, key=lambda s: s[0])):  # first turns in arrival order
        first = len(prompts)
        context = system_prompt
        for k, (user, out, gap) in enumerate(turns):
            context += user
            arrivals.append(start if k == 0 else np.nan)
            prompts.append(context)
            outputs.append(out)
            if jitter and k > 0 and gap > 0:
                gap += 1e-6 * jitter_rng.random()
            think.append(-1.0 if k == 0 else gap)
            next_turn.append(len(prompts) if k + 1 < len(turns) else -1)
            seq.append(first)
            session.append(number)
            context += out
    n = len(prompts)
    content = {"seq_id": np.array(seq, np.int64), "shared_tokens": np.full(n, system_prompt, np.int64),
               "shared_id": np.zeros(n, np.int64), "session": np.array(session, np.int64)}
    return arrivals, prompts, outputs, (next_turn, think), content


def content_fn(prompts, content, bs):
    n = len(prompts)
    c = BlockSources(np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.asarray(prompts, np.int64), content["seq_id"],
                     content["shared_tokens"], content["shared_id"])
    return lambda req, m: int(px.block_content_nb(req, m, bs, c, 0))


conversations = st.lists(st.tuples(
    st.floats(0, 2, allow_nan=False),
    st.lists(st.tuples(st.integers(1, 60), st.integers(1, 30), st.sampled_from([0.0, 0.01, 0.3])),
             min_size=1, max_size=4)), min_size=1, max_size=8)


@given(sessions=conversations, bs=st.sampled_from([4, 16]), max_seqs=st.integers(1, 6),
       budget=st.integers(40, 300), apc=st.booleans(), system_prompt=st.sampled_from([0, 20]))
def test_conversations_match_reference(sessions, bs, max_seqs, budget, apc, system_prompt):
    arrivals, prompts, outputs, turns, content = build(sessions, system_prompt, jitter=True)
    num_blocks = max(-(-(p + o) // bs) for p, o in zip(prompts, outputs)) + 8
    r = run(arrivals, prompts, outputs, max_num_seqs=max_seqs, max_num_batched_tokens=budget, block_size=bs,
            num_blocks=num_blocks, turns=turns, content=content, prefix_caching=apc, timeline=False)
    stats = {}
    reqs, _ = ref.simulate_reference(
        CM, arrivals, prompts, outputs, max_num_seqs=max_seqs, max_num_batched_tokens=budget, block_size=bs,
        num_blocks=num_blocks, overhead_s=OVERHEAD, turns=turns,
        content=content_fn(prompts, content, bs) if apc else None, stats=stats)
    assert r.per_replica["prefix_cache_evictions"] == stats["evictions"]
    for i, q in enumerate(reqs):
        assert r.preemptions[i] == q.preemptions, i
        assert r.cached_tokens[i] == q.cached, i
        for got, want in ((r.arrival_s[i], q.arrival), (r.first_token_s[i], q.first_token),
                          (r.finish_s[i], q.finish)):
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), i
    assert (r.status == E.FINISHED).all()
    # A later turn arrives exactly its think time after the previous answer.
    nxt, think = turns
    for i, j in enumerate(nxt):
        if j >= 0:
            assert r.arrival_s[j] == r.finish_s[i] + think[j]


def test_multi_turn_ttft_with_and_without_prefix_caching_by_hand():
    # One conversation of two turns, alone on the GPU. Turn 1: 64-token prompt, 16-token answer.
    # Turn 2 (1 s later): 64 + 16 + 32 = 112 tokens. Turn 1 computed KV for its prompt and its first
    # 15 answer tokens (the last one is sampled, never fed back): 79 tokens = 4 full 16-token blocks
    # cached, so turn 2 prefills 112 - 64 = 48 tokens over a 64-token cached prefix.
    arrivals, prompts, outputs, turns, content = build([(0.0, [(64, 16, 1.0), (32, 8, 1.0)])])
    assert prompts == [64, 112]
    plain = run(arrivals, prompts, outputs, turns=turns, content=content, timeline=False)
    cached = run(arrivals, prompts, outputs, turns=turns, content=content, timeline=False, prefix_caching=True)
    ttft = lambda r: r.first_token_s - r.arrival_s  # noqa: E731
    assert cached.cached_tokens.tolist() == [0, 64]
    # Turn 1 is the same either way; turn 2's prefill shrinks from 112 tokens to 48 after 64.
    assert ttft(plain)[0] == pytest.approx(OVERHEAD + fwd(new=[64], ctx=[0]), rel=1e-9)
    assert ttft(cached)[0] == pytest.approx(ttft(plain)[0], rel=1e-12)
    want_plain = OVERHEAD + fwd(new=[112], ctx=[0])
    want_cached = OVERHEAD + fwd(new=[48], ctx=[64])
    assert ttft(plain)[1] == pytest.approx(want_plain, rel=1e-9)
    assert ttft(cached)[1] == pytest.approx(want_cached, rel=1e-9)
    # Mean TTFT over the two turns falls by half the difference of turn 2's prefills.
    drop = ttft(plain).mean() - ttft(cached).mean()
    assert drop == pytest.approx((want_plain - want_cached) / 2, rel=1e-9) and drop > 0
    # The second turn arrives when the first answer is complete, plus the 1 s think time.
    assert cached.arrival_s[1] == cached.finish_s[0] + 1.0


def test_a_turn_whose_previous_turn_never_finishes_never_arrives():
    arrivals, prompts, outputs, turns, content = build([(0.0, [(64, 500, 0.0), (32, 8, 0.0)])])
    r = run(arrivals, prompts, outputs, turns=turns, content=content, timeline=False, max_time_s=0.5)
    assert r.status.tolist() == [E.UNFINISHED, E.UNFINISHED]
    assert np.isnan(r.arrival_s[1])


@given(sessions=conversations, bs=st.sampled_from([1, 4, 16]), max_seqs=st.integers(1, 8),
       budget=st.integers(40, 300), replicas=st.integers(1, 3), apc=st.booleans(), spare=st.integers(0, 30),
       policy=st.sampled_from([E.ROUTE_ROUND_ROBIN, E.ROUTE_LEAST_KV, E.ROUTE_SESSION_AFFINITY,
                              E.ROUTE_PREFIX_AWARE]), stages=st.sampled_from([1, 1, 2]))
def test_decode_stretches_change_nothing_with_conversations_and_prefix_caching(
        sessions, bs, max_seqs, budget, replicas, apc, spare, policy, stages):
    arrivals, prompts, outputs, turns, content = build(sessions, system_prompt=24)
    outputs = [5 * o for o in outputs]  # long enough decodes to stretch
    num_blocks = max(-(-(p + o) // bs) for p, o in zip(prompts, outputs)) + spare  # small: evictions, preemptions
    session = np.searchsorted(np.unique(content["seq_id"]), content["seq_id"])
    kw = dict(max_num_seqs=max_seqs, max_num_batched_tokens=budget, block_size=bs, num_blocks=num_blocks,
              turns=turns, content=content, prefix_caching=apc, timeline=False, replicas=replicas, policy=policy,
              session=session, stages=stages)
    a = run(arrivals, prompts, outputs, fast_decode=True, **kw)
    b = run(arrivals, prompts, outputs, fast_decode=False, **kw)
    for key in ("status", "arrival_s", "first_scheduled_s", "first_token_s", "finish_s", "generated", "preemptions", "max_itl_s",
                "replica", "cached_tokens", "itl_hist"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    assert_same_stats(a, b, "iterations", "peak_kv_blocks_used", "free_blocks_at_end", "preemptions", "requests",
                      "prefix_cache_evictions", "prefix_cache_hit_tokens")


@pytest.mark.parametrize("route_params, to", [((0.5, 32, 1.0001), 0),   # balanced: the replica caching 64 of 100
                                              ((0.9, 32, 1.0001), 1),   # 64/100 < 0.9: the least loaded
                                              ((0.5, 0, 1.0001), 1)])   # 2 vs 1 requests is unbalanced at 0
def test_prefix_aware_router_by_hand(route_params, to):
    # A (system prompt of 64 tokens, 4 blocks) and unrelated Y go to replica 0, unrelated X to
    # replica 1 (least loaded, ties to the lower index). B shares A's system prompt and arrives while
    # all three still decode: replica 0 holds 2 requests and caches B's first 64 tokens, replica 1 holds 1.
    arrivals = [0.0, 0.001, 0.002, 0.5]
    prompts, outputs = [100, 100, 100, 100], [200, 200, 200, 10]
    content = {"shared_tokens": np.array([64, 0, 0, 64]), "shared_id": np.zeros(4, np.int64)}
    r = run(arrivals, prompts, outputs, replicas=2, policy=E.ROUTE_PREFIX_AWARE, prefix_caching=True,
            content=content, route_params=route_params, timeline=False)
    assert r.replica[:3].tolist() == [0, 1, 0]
    assert r.replica[3] == to
    assert r.cached_tokens[3] == (64 if to == 0 else 0)


def test_round_robin_takes_turns_when_conversations_decide_the_arrival_order():
    # Two conversations of two turns each, 4 replicas: the four requests in the order they arrive
    # (first turns at 0 and 0.01 s, second turns after each answer plus 1 s) go to replicas 0..3.
    arrivals, prompts, outputs, turns, content = build([(0.0, [(50, 5, 1.0), (50, 5, 1.0)]),
                                                        (0.01, [(50, 5, 1.0), (50, 5, 1.0)])])
    r = run(arrivals, prompts, outputs, replicas=4, turns=turns, content=content, timeline=False)
    order = np.argsort(r.arrival_s, kind="stable")
    assert r.replica[order].tolist() == [0, 1, 2, 3]


@given(sessions=conversations, bs=st.sampled_from([1, 4]), max_seqs=st.integers(1, 6), budget=st.integers(40, 300),
       apc=st.booleans(), lpm=st.booleans(), spare=st.integers(0, 40), system_prompt=st.sampled_from([0, 20]),
       chunked=st.booleans(), timeline=st.booleans())
def test_sglang_scheduler_matches_reference(sessions, bs, max_seqs, budget, apc, lpm, spare, system_prompt, chunked,
                                            timeline):
    """SGLang's scheduler against the reference, iteration by iteration (a timeline) or with steady
    decoding stepped in O(1) each (without)."""
    arrivals, prompts, outputs, turns, content = build(sessions, system_prompt, jitter=True)
    keep = [p + o <= budget or chunked for p, o in zip(prompts, outputs)]
    if not all(keep):
        return  # (unchunked prompts longer than the budget are refused before simulation)
    num_blocks = max(-(-(p + o) // bs) for p, o in zip(prompts, outputs)) + spare
    r = run(arrivals, prompts, outputs, max_num_seqs=max_seqs, max_num_batched_tokens=budget, block_size=bs,
            num_blocks=num_blocks, turns=turns, content=content, prefix_caching=apc, timeline=timeline,
            sglang=True, lpm=lpm, chunked=chunked)
    reqs, history = ref.simulate_reference(
        CM, arrivals, prompts, outputs, max_num_seqs=max_seqs, max_num_batched_tokens=budget, block_size=bs,
        num_blocks=num_blocks, overhead_s=OVERHEAD, turns=turns, chunked_prefill=chunked,
        content=content_fn(prompts, content, bs) if apc else None, sglang=True, lpm=lpm)
    for i, q in enumerate(reqs):
        assert r.preemptions[i] == q.preemptions, i
        assert r.cached_tokens[i] == q.cached, i
        for got, want in ((r.first_scheduled_s[i], q.first_scheduled), (r.first_token_s[i], q.first_token),
                          (r.finish_s[i], q.finish)):
            assert (np.isnan(got) and want is None) or got == pytest.approx(want, rel=1e-9, abs=1e-12), i
    assert r.per_replica["iterations"] == len(history)


def test_sglang_runs_prefills_apart_from_decodes_by_hand():
    # A decodes alone; B (500 tokens) arrives at 0.1 s. vLLM puts B's prefill beside A's decode in
    # one batch; SGLang runs B's prefill alone.
    kw = dict(timeline=True, max_num_seqs=8)
    v = run([0.0, 0.1], [100, 500], [50, 5], **kw)
    g = run([0.0, 0.1], [100, 500], [50, 5], sglang=True, **kw)
    row_v, row_g = (r.timeline[r.timeline[:, E.TL_PREFILL_TOKENS] == 500][0] for r in (v, g))
    assert row_v[E.TL_NUM_DECODES] == 1 and row_g[E.TL_NUM_DECODES] == 0
    t0 = row_v[E.TL_START_S]
    assert row_g[E.TL_START_S] == t0  # the same iteration boundary admits B in both
    # A's KV before that step: its 100-token prompt and one token per decode iteration after the first.
    iterations_before = int((v.timeline[:, E.TL_START_S] < t0).sum())
    a_kv = 100 + iterations_before - 1
    assert v.first_token_s[1] == pytest.approx(t0 + OVERHEAD + fwd(dec=[a_kv], new=[500], ctx=[0]), rel=1e-9)
    assert g.first_token_s[1] == pytest.approx(t0 + OVERHEAD + fwd(new=[500], ctx=[0]), rel=1e-9)


@given(lengths=st.lists(st.tuples(st.integers(1, 80), st.integers(1, 40)), min_size=1, max_size=24),
       concurrency=st.integers(1, 6), max_seqs=st.integers(1, 6), budget=st.integers(80, 300),
       fast=st.booleans())
def test_closed_loops_match_reference(lengths, concurrency, max_seqs, budget, fast):
    """A closed loop (`vllm bench serve --max-concurrency`): the first requests at once, then each
    finish sends the first request not yet sent, whichever request finished (pointers -2 - row, as
    fastsim.workload lays them out); in both modes, against the reference scheduler."""
    n = len(lengths)
    prompts, outputs = [p for p, _ in lengths], [o for _, o in lengths]
    rows = np.arange(n)
    ptr = np.where(rows < concurrency, concurrency, rows + 1)
    next_turn = [int(-2 - q) if q < n else -1 for q in ptr]
    think = [-1.0 if i < concurrency else 0.0 for i in range(n)]
    arrivals = [0.0 if i < concurrency else np.nan for i in range(n)]
    bs = 4
    num_blocks = max(-(-(p + o) // bs) for p, o in lengths) + 8
    r = run(arrivals, prompts, outputs, max_num_seqs=max_seqs, max_num_batched_tokens=budget, block_size=bs,
            num_blocks=num_blocks, turns=(next_turn, think), timeline=False, fast=fast)
    reqs, _ = ref.simulate_reference(
        CM, arrivals, prompts, outputs, max_num_seqs=max_seqs, max_num_batched_tokens=budget, block_size=bs,
        num_blocks=num_blocks, overhead_s=OVERHEAD, turns=(next_turn, think))
    for i, q in enumerate(reqs):
        for got, want in ((r.arrival_s[i], q.arrival), (r.first_token_s[i], q.first_token),
                          (r.finish_s[i], q.finish)):
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), i
    assert (r.status == E.FINISHED).all()
    # never more than `concurrency` in flight; the rows are sent in their order
    sent = np.asarray(r.arrival_s)
    assert (np.diff(sent) >= 0).all()
    events = sorted([(f, 0) for f in r.finish_s] + [(a, 1) for a in sent])
    level = np.cumsum([1 if kind else -1 for _, kind in events])
    assert level.max() == min(concurrency, n)
