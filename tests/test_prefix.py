"""Prefix-cache building blocks against plain-Python twins (dict, OrderedDict) on random operations."""
from collections import OrderedDict

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastsim.engine import prefix_nb as px


@given(ops=st.lists(st.tuples(st.sampled_from(["ins", "del", "find"]), st.integers(0, 40)), max_size=300),
       size_log2=st.integers(6, 8))
def test_hash_table_matches_a_dict(ops, size_log2):
    keys = np.full(1 << size_log2, px.EMPTY, np.int64)
    vals = np.full(1 << size_log2, px.EMPTY, np.int64)
    ref = {}
    for op, k in ops:
        # Keys colliding on purpose: multiples of the table size share a home slot.
        key = int(px.mix_nb(k, 7)) if k % 3 else k * keys.size
        if op == "ins":
            assert px.ht_add_nb(keys, vals, key, k) == (key not in ref)
            ref.setdefault(key, k)
        elif op == "del":
            assert px.ht_delete_nb(keys, vals, key) == (key in ref)
            ref.pop(key, None)
        for rk, rv in ref.items():
            assert px.ht_find_nb(keys, vals, rk) == rv
        assert px.ht_find_nb(keys, vals, key) == ref.get(key, px.EMPTY)
        assert (keys != px.EMPTY).sum() == len(ref)


@given(ops=st.lists(st.tuples(st.sampled_from(["pop", "push", "remove"]), st.integers(0, 19)), max_size=200))
def test_free_list_matches_an_ordered_dict(ops):
    prev, nxt, ends = px.fl_init_nb(20)
    ref = OrderedDict((b, None) for b in range(20))
    for op, b in ops:
        if op == "pop":
            got = px.fl_pop_head_nb(prev, nxt, ends)
            want = next(iter(ref)) if ref else px.EMPTY
            ref.pop(want, None)
            assert got == want
        elif op == "push" and b not in ref:
            px.fl_push_tail_nb(prev, nxt, ends, b)
            ref[b] = None
        elif op == "remove" and b in ref:
            px.fl_remove_nb(prev, nxt, ends, b)
            del ref[b]
        walk, x = [], ends[0]
        while x != px.EMPTY:
            walk.append(int(x))
            x = nxt[x]
        assert walk == list(ref)


def test_block_content_follows_source_blocks():
    # Two requests sharing their first 512-token block (id 7), differing in the second.
    offsets = np.array([0, 2, 4])
    ids = np.array([7, 8, 7, 9])
    prompt = np.array([1024, 1024])
    content = (offsets, ids, prompt, np.arange(2), np.zeros(2, np.int64), np.zeros(2, np.int64))
    c = lambda req, m, bs=16: px.block_content_nb(req, m, bs, content, 512)  # noqa: E731
    assert all(c(0, m) == c(1, m) for m in range(32))      # tokens 0..511: the shared block
    assert all(c(0, m) != c(1, m) for m in range(32, 64))  # tokens 512..1023: different blocks
    assert c(0, 64) != c(1, 64)                            # past the ids: unique per request
    assert len({c(0, m) for m in range(64)}) == 64         # offsets inside a source block differ
    # An engine block straddling two source blocks depends on both.
    assert px.block_content_nb(0, 1, 384, content, 512) != px.block_content_nb(1, 1, 384, content, 512)
    assert px.block_content_nb(0, 0, 384, content, 512) == px.block_content_nb(1, 0, 384, content, 512)
    # Past the prompt (generated tokens) a block is the request's own, whatever the ids say.
    short = (offsets, ids, np.array([1000, 1000]), np.arange(2), np.zeros(2, np.int64), np.zeros(2, np.int64))
    assert px.block_content_nb(0, 61, 16, short, 512) != px.block_content_nb(1, 61, 16, short, 512)
    assert px.block_content_nb(0, 62, 16, short, 512) != px.block_content_nb(1, 62, 16, short, 512)
    assert px.block_content_nb(0, 0, 16, short, 512) == px.block_content_nb(1, 0, 16, short, 512)


def test_block_content_of_system_prompts_and_conversations():
    # Requests 0 and 1: one client's 40-token system prompt, own sequences; 2 and 3: turns of one
    # conversation (seq 2); 4: another client with the same system prompt length.
    n = 5
    content = (np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.array([100, 100, 60, 200, 100]),
               np.array([0, 1, 2, 2, 4]), np.array([40, 40, 40, 40, 40]), np.array([0, 0, 0, 0, 1]))
    c = lambda req, m: px.block_content_nb(req, m, 16, content, 0)  # noqa: E731
    assert c(0, 0) == c(1, 0) == c(2, 0) and c(0, 1) == c(1, 1)  # tokens 0..31: inside the system prompt
    assert c(0, 2) != c(1, 2)        # tokens 32..47 straddle its end: each request's own
    assert c(0, 0) != c(4, 0)        # another client's system prompt
    assert all(c(2, m) == c(3, m) for m in range(2, 12))  # one conversation: same tokens at each position
    assert c(2, 2) != c(0, 2)


def test_mix_is_never_empty_and_spreads():
    vals = {int(px.mix_nb(a, b)) for a in range(50) for b in range(50)}
    assert len(vals) == 2500 and min(vals) >= 0

