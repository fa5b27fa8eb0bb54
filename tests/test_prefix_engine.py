"""Prefix caching in the engine: against the plain-Python reference, and a hand-computed case."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from fastsim.engine import enums as E
from fastsim.engine import prefix_nb as px
from fastsim.workload import BlockSources
from test_engine import CM, OVERHEAD, fwd, run


def content_fn(offsets, ids, bs, source, prompts):
    n = len(prompts)
    content = BlockSources(offsets, ids, np.asarray(prompts, np.int64), np.arange(n, dtype=np.int64),
                           np.zeros(n, np.int64), np.zeros(n, np.int64))
    return lambda req, m: int(px.block_content_nb(req, m, bs, content, source))


# Requests whose prompts are made of a few shared 32-token "source blocks": ids from a small
# vocabulary, prefix-consistent (a request's i-th id depends on its first i+1 choices).
shared = st.integers(1, 25).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0, 2, allow_nan=False), min_size=n, max_size=n),
    st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=6), min_size=n, max_size=n),
    st.lists(st.integers(0, 31), min_size=n, max_size=n),
    st.lists(st.integers(1, 40), min_size=n, max_size=n)))


def build(choices, extra):
    """Prompt lengths and prefix-consistent ids of 32-token source blocks."""
    prompts, lens, ids = [], [], []
    for ch, x in zip(choices, extra):
        path = [hash(tuple(ch[: i + 1])) & 0xFFFFFF for i in range(len(ch))]
        ids += path
        lens.append(len(path))
        prompts.append(32 * len(ch) - x)  # the last source block partly filled
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return prompts, offsets, np.array(ids, np.int64)


@given(wl=shared, bs=st.sampled_from([8, 16, 32]), num_blocks=st.integers(12, 80),
       max_seqs=st.integers(1, 8), budget=st.integers(40, 300), threshold=st.sampled_from([0, 24]))
def test_prefix_caching_matches_reference(wl, bs, num_blocks, max_seqs, budget, threshold):
    arrivals, choices, extra, outputs = wl
    prompts, offsets, ids = build(choices, extra)
    keep = [i for i in range(len(prompts)) if -(-(prompts[i] + outputs[i]) // bs) <= num_blocks]
    if not keep:
        return
    # Keep the ids of the kept requests only, in order.
    sub_ids = np.concatenate([ids[offsets[i]:offsets[i + 1]] for i in keep]).astype(np.int64)
    sub_off = np.concatenate([[0], np.cumsum([offsets[i + 1] - offsets[i] for i in keep])]).astype(np.int64)
    arr = sorted(arrivals)[: len(keep)]
    pr = [prompts[i] for i in keep]
    out = [outputs[i] for i in keep]
    r = run(arr, pr, out, max_num_seqs=max_seqs, max_num_batched_tokens=budget, block_size=bs,
            num_blocks=num_blocks, threshold=threshold, timeline=True, prefix_caching=True,
            block_ids=(sub_off, sub_ids, 32))
    stats = {}
    reqs, history = ref.simulate_reference(
        CM, arr, pr, out, max_num_seqs=max_seqs, max_num_batched_tokens=budget, block_size=bs,
        num_blocks=num_blocks, long_prefill_token_threshold=threshold, overhead_s=OVERHEAD,
        content=content_fn(sub_off, sub_ids, bs, 32, pr), stats=stats)
    assert r.per_replica["prefix_cache_evictions"] == stats["evictions"]
    for i, q in enumerate(reqs):
        assert r.cached_tokens[i] == q.cached, i
        assert r.preemptions[i] == q.preemptions, i
        assert r.finish_s[i] == pytest.approx(q.finish, rel=1e-9), i
        assert r.first_token_s[i] == pytest.approx(q.first_token, rel=1e-9), i
    assert r.per_replica["iterations"] == len(history)
    assert [int(u) for u in r.timeline[:, E.TL_KV_BLOCKS_USED]] == [u for _, u in history]
    assert (r.status == E.FINISHED).all()


def test_shared_prompt_is_prefilled_once_by_hand():
    """Two 4,000-token prompts with the same content, B arriving after A finished: B finds
    floor(3999 / 16) = 249 cached blocks (3,984 tokens) and prefills only the last 16."""
    offsets = np.array([0, 1, 2])
    ids = np.array([42, 42])
    r = run([0.0, 5.0], [4000, 4000], [2, 2], prefix_caching=True, block_ids=(offsets, ids, 4096), timeline=False)
    assert r.cached_tokens.tolist() == [0, 3984]
    assert r.first_token_s[1] - 5.0 == pytest.approx(fwd(new=[16], ctx=[3984]) + OVERHEAD, rel=1e-12)
    off = run([0.0, 5.0], [4000, 4000], [2, 2], prefix_caching=False, timeline=False)
    assert off.first_token_s[1] - 5.0 == pytest.approx(fwd(new=[4000], ctx=[0]) + OVERHEAD, rel=1e-12)
    assert r.first_token_s[1] - 5.0 < 0.2 * (off.first_token_s[1] - 5.0)


def test_preempted_request_recomputes_from_its_own_cached_blocks():
    # Without shared content, caching still helps a preempted request find its own blocks again
    # if nothing evicted them; with a cache this small, eviction decides, as in vLLM.
    r = run([0.0, 0.0], [64, 64], [40, 40], block_size=16, num_blocks=9, prefix_caching=True, timeline=False)
    reqs, _ = ref.simulate_reference(CM, [0.0, 0.0], [64, 64], [40, 40], max_num_seqs=256,
                                     max_num_batched_tokens=8192, block_size=16, num_blocks=9,
                                     overhead_s=OVERHEAD, content=content_fn(np.zeros(3, np.int64),
                                                                            np.zeros(0, np.int64), 16, 0, [64, 64]))
    assert r.preemptions.tolist() == [q.preemptions for q in reqs] and r.preemptions.sum() > 0
    assert r.finish_s.tolist() == pytest.approx([q.finish for q in reqs], rel=1e-9)
