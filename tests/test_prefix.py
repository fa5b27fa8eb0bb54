"""Prefix-cache building blocks against plain-Python twins (dict, OrderedDict) on random operations."""
from collections import OrderedDict

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastsim.engine import prefix_nb as px
from fastsim.workload import BlockSources


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
    content = BlockSources(offsets, ids, prompt, np.arange(2), np.zeros(2, np.int64), np.zeros(2, np.int64))
    c = lambda req, m, bs=16: px.block_content_nb(req, m, bs, content, 512)  # noqa: E731
    assert all(c(0, m) == c(1, m) for m in range(32))      # tokens 0..511: the shared block
    assert all(c(0, m) != c(1, m) for m in range(32, 64))  # tokens 512..1023: different blocks
    assert c(0, 64) != c(1, 64)                            # past the ids: unique per request
    assert len({c(0, m) for m in range(64)}) == 64         # offsets inside a source block differ
    # An engine block straddling two source blocks depends on both.
    assert px.block_content_nb(0, 1, 384, content, 512) != px.block_content_nb(1, 1, 384, content, 512)
    assert px.block_content_nb(0, 0, 384, content, 512) == px.block_content_nb(1, 0, 384, content, 512)
    # Past the prompt (generated tokens) a block is the request's own, whatever the ids say.
    short = BlockSources(offsets, ids, np.array([1000, 1000]), np.arange(2), np.zeros(2, np.int64), np.zeros(2, np.int64))
    assert px.block_content_nb(0, 61, 16, short, 512) != px.block_content_nb(1, 61, 16, short, 512)
    assert px.block_content_nb(0, 62, 16, short, 512) != px.block_content_nb(1, 62, 16, short, 512)
    assert px.block_content_nb(0, 0, 16, short, 512) == px.block_content_nb(1, 0, 16, short, 512)


def test_block_content_of_system_prompts_and_conversations():
    # Requests 0 and 1: one client's 40-token system prompt, own sequences; 2 and 3: turns of one
    # conversation (seq 2); 4: another client with the same system prompt length.
    n = 5
    content = BlockSources(np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.array([100, 100, 60, 200, 100]),
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



# -- the engine's cache (private blocks as extents) against reference.PrefixCache (a block each) ----
def _content(prompts, outputs, ids_per_req, seq, shared_len, shared_id):
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids_per_req])]).astype(np.int64)
    ids = np.array([i for x in ids_per_req for i in x], np.int64)
    return BlockSources(offsets, ids, np.asarray(prompts, np.int64), np.asarray(seq, np.int64),
                        np.asarray(shared_len, np.int64), np.asarray(shared_id, np.int64))


def _cache(content, source, num_blocks, bs, max_seqs, longest, session=None):
    from fastsim.engine import enums as E
    from fastsim.kernel_run import prefix_cache_arrays
    from fastsim.workload import Workload

    n = content[2].size
    ints = np.zeros(E.N_RI, np.int64)
    ints[[E.RI_APC, E.RI_NUM_BLOCKS, E.RI_MAX_SEQS, E.RI_BLOCK_SIZE]] = [1, num_blocks, max_seqs, bs]
    wl = Workload(np.zeros(n), content[2], np.full(n, longest, np.int64) - content[2], np.zeros(n, np.int32), ("c",),
                  content[0], content[1], source, seq_id=content[3], shared_tokens=content[4], shared_id=content[5],
                  session=session)
    apc = prefix_cache_arrays(np.array([ints]), wl)
    px.apc_init_nb(apc, 0, num_blocks)
    return apc


workloads = st.integers(2, 7).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=4), min_size=n, max_size=n),  # id choices
    st.lists(st.integers(1, 100), min_size=n, max_size=n),                                  # prompt
    st.lists(st.integers(0, 3), min_size=n, max_size=n),                                    # seq group
    st.lists(st.sampled_from([0, 0, 20]), min_size=n, max_size=n)))                        # system prompt


@given(wl=workloads, bs=st.sampled_from([4, 8, 16]), num_blocks=st.integers(12, 40),
       ops=st.lists(st.tuples(st.sampled_from(["admit", "grow", "finish", "preempt"]), st.integers(0, 6),
                              st.integers(1, 40)), min_size=30, max_size=80), turns=st.booleans())
def test_cache_with_private_blocks_matches_a_block_per_block_cache(wl, bs, num_blocks, ops, turns):
    """Random admissions (lookup, cached blocks taken, chunk allocated and named), growth, finishes
    and preemptions (publish, release, looked up again later): every lookup's hits, the free count
    and the evictions agree with reference.PrefixCache, which names and tracks every block; so do
    matches of the requests waiting to run (first or again). With `turns`, the requests of a token
    sequence are one conversation's turns, each there only once the one before has finished: the
    blocks past their prompts are named only when they finish or are preempted (deferred), which
    none of these lookups can tell."""
    import reference as ref

    choices, prompts, seqs, sys_len = wl
    n = len(prompts)
    ids = [[hash(tuple(c[: j + 1])) & 0xFFFF for j in range(len(c))] for c in choices]
    prompts = [max(p, 8 * len(c)) for p, c in zip(prompts, choices)]
    if turns:  # a later turn's prompt: the first turn's, and 24 tokens more a turn (into earlier answers)
        first = {g: seqs.index(g) for g in seqs}
        ids = [ids[first[g]] for g in seqs]
        prompts = [prompts[first[g]] + 24 * seqs[:i].count(g) for i, g in enumerate(seqs)]
    longest = max(prompts) + 40
    content = _content(prompts, [longest - p for p in prompts], ids, seqs, sys_len, [0] * n)
    source = 8
    apc = _cache(content, source, num_blocks, bs, n, longest, np.asarray(seqs, np.int64) if turns else None)
    if turns:
        # A first turn defers its answer's blocks (later ones are covered by the first's length).
        firsts = [seqs.index(g) for g in set(seqs) if seqs.count(g) > 1]
        assert all(apc.shareable_running[i] == max(prompts[i], sys_len[i]) for i in firsts)
    # A turn is there once every earlier request of its sequence has finished.
    there = lambda q: not turns or all(j in done for j in range(q.id) if seqs[j] == seqs[q.id])  # noqa: E731
    cache = ref.PrefixCache(num_blocks, bs, lambda q, m: int(px.block_content_nb(q, m, bs, content, source)))
    reqs = [ref.Req(i, 0.0, prompts[i], longest - prompts[i]) for i in range(n)]
    slot = {}    # request -> engine slot
    done = set()  # finished requests: never looked up again
    free = num_blocks
    hit_buf = np.zeros(num_blocks, np.int64)
    for op, who, amount in ops:
        q = reqs[who % n]
        if op == "admit" and q.id not in slot and q.id not in done and there(q):
            hits, key = px.apc_lookup_nb(apc, 0, q.id, q.num_tokens, bs, hit_buf)
            want, want_key = cache.lookup(q)
            assert hits == len(want)
            new = min(amount, q.num_tokens - hits * bs)
            need = -(-(hits * bs + new) // bs) - hits
            idle = px.apc_idle_nb(apc, hit_buf, hits)
            assert idle == sum(cache.ref[b] == 0 for b in want)
            if need + idle > free:
                continue
            k = len(slot)
            slot[q.id] = k
            free -= px.apc_start_nb(apc, 0, k, q.id, bs, hit_buf, hits, key) + need
            cache.start(q, want, want_key)
            q.computed, q.blocks = hits * bs + new, hits + need
            px.apc_allocate_nb(apc, 0, k, need)
            cache.allocate(q, need)
            px.apc_hash_full_nb(apc, 0, k, q.id, q.computed, bs)
            cache.hash_full(q)
        elif op == "grow" and q.id in slot:
            new = min(amount, q.prompt + q.output - q.computed)
            need = -(-(q.computed + new) // bs) - q.blocks
            if need > free:
                continue
            free -= need
            q.computed += new
            q.blocks += need
            q.generated = max(q.generated, q.computed - q.prompt)
            px.apc_allocate_nb(apc, 0, slot[q.id], need)
            cache.allocate(q, need)
            px.apc_hash_full_nb(apc, 0, slot[q.id], q.id, q.computed, bs)
            cache.hash_full(q)
        elif op in ("finish", "preempt") and q.id in slot:
            k = slot.pop(q.id)
            if op == "finish":
                done.add(q.id)
            if op == "preempt":
                px.apc_publish_nb(apc, 0, k, q.id, bs)
                freed = px.apc_release_nb(apc, 0, k)
            else:
                freed = px.apc_finish_nb(apc, 0, k, q.id, bs)
            assert freed == cache.release(q)
            free += freed
            q.computed = q.blocks = 0
            last = len(slot)  # the engine keeps slots 0..n-1: the last one moves into the hole
            for other, j in slot.items():
                if j == last:
                    px.apc_move_slot_nb(apc, 0, j, k)
                    slot[other] = k
        assert free == len(cache.free)
        assert apc.rep[0, px.EVICTIONS] == cache.evictions
        for p in reqs:
            if p.id not in slot and p.id not in done and there(p):
                assert px.apc_match_nb(apc, 0, p.id, p.num_tokens, bs)[0] == len(cache.lookup(p)[0])


def test_shareable_tokens_by_hand():
    # 0 and 1 share their first two source ids (8 tokens each), 2 only the first with them; 3 and 4
    # are turns of one conversation; 5 and 6 one client's 20-token system prompt, 7 another's alone.
    ids = [[1, 2, 3], [1, 2, 4], [1, 5], [], [], [], [], []]
    content = _content([24, 30, 12, 50, 60, 40, 40, 40], [0] * 8, ids, [0, 1, 2, 3, 3, 5, 6, 7],
                       [0, 0, 0, 0, 0, 20, 20, 20], [0, 0, 0, 0, 0, 1, 1, 2])
    got = px.shareable_tokens(content, 8)
    assert got.tolist() == [16, 16, 8, px.SHARED_ALL, px.SHARED_ALL, 20, 20, 0]
    # A shared prefix is capped at the prompt: past it a block holds the request's own answer.
    assert px.shareable_tokens(_content([10, 30], [0, 0], [[1, 2], [1, 2]], [0, 1], [0, 0], [0, 0]), 8).tolist() \
        == [10, 16]


def test_running_shareable_tokens_by_hand():
    # 0 and 1: turns of conversation 0 (prompts 40 and 90, a 20-token system prompt); 2: a request
    # alone (its system prompt shared with 0 and 1); 3 and 4: one token sequence but not one
    # conversation's turns (no workload makes them; they may run at once); 5 and 6: turns of
    # conversation 1, under a 100-token system prompt longer than 5's prompt.
    content = _content([40, 90, 30, 50, 50, 60, 130], [0] * 7, [[]] * 7, [0, 0, 2, 3, 3, 5, 5],
                       [20, 20, 20, 0, 0, 100, 100], [0, 0, 0, 0, 0, 1, 1])
    shareable = px.shareable_tokens(content, 0)
    assert shareable.tolist() == [px.SHARED_ALL] * 2 + [20] + [px.SHARED_ALL] * 4
    session = np.array([0, 0, -1, -1, -1, 1, 1])
    # A turn's blocks past its prompt and its system prompt are shareable only once it has finished.
    got = px.running_shareable_tokens(content, shareable, session, np.zeros(7, np.int64))
    assert got.tolist() == [40, 90, 20, px.SHARED_ALL, px.SHARED_ALL, 100, 130]
    session[3:5] = [7, 8]  # 3 and 4 in different sessions: still no deferring
    assert px.running_shareable_tokens(content, shareable, session, np.zeros(7, np.int64))[3:5].tolist() == \
        [px.SHARED_ALL] * 2
    # An earlier turn longer than a later one's prompt (prompt and output 40 + 70 > 90): the later
    # turn's blocks up to 110 tokens may be cached copies of the earlier's, so they stay public.
    outputs = np.array([70, 0, 0, 0, 0, 0, 0])
    assert px.running_shareable_tokens(content, shareable, session, outputs)[:2].tolist() == [40, 110]


@given(wl=workloads, bs=st.sampled_from([1, 4, 8, 16]))
def test_no_block_past_the_shareable_tokens_is_anyone_elses(wl, bs):
    """Brute force: every block (prompt and answer) of every request, keyed as the cache keys it;
    a block ending past its request's shareable tokens has a key no other request has, and one
    ending past those shareable while it runs, only its conversation's later turns."""
    choices, prompts, seqs, sys_len = wl
    ids = [[hash(tuple(c[: j + 1])) & 0xFFFF for j in range(len(c))] for c in choices]
    prompts = [max(p, 8 * len(c)) for p, c in zip(prompts, choices)]
    content = _content(prompts, [0] * len(prompts), ids, seqs, sys_len, [0] * len(prompts))
    shareable = px.shareable_tokens(content, 8)
    owners = {}
    for i, p in enumerate(prompts):
        key = px.ROOT_KEY
        for m in range((p + 40) // bs):
            key = int(px.mix_nb(key, px.block_content_nb(i, m, bs, content, 8)))
            owners.setdefault(key, set()).add(i)
            if (m + 1) * bs > shareable[i]:
                assert owners[key] == {i}, (i, m)
    # With each token sequence one conversation's turns (in row order; each request's 40 tokens past
    # its prompt, its output): past the tokens shareable while it runs, a block is no earlier
    # turn's (none has a copy cached) and only later turns' (which arrive once it has finished).
    running = px.running_shareable_tokens(content, shareable, np.asarray(seqs, np.int64),
                                          np.full(len(prompts), 40, np.int64))
    for i, p in enumerate(prompts):  # (and afterwards too: the check above saw only earlier requests)
        key = px.ROOT_KEY
        for m in range((p + 40) // bs):
            key = int(px.mix_nb(key, px.block_content_nb(i, m, bs, content, 8)))
            if (m + 1) * bs > shareable[i]:
                assert owners[key] == {i}, (i, m)
            if (m + 1) * bs > running[i]:
                assert all(seqs[j] == seqs[i] and j >= i for j in owners[key]), (i, m)


def test_partly_filled_last_block_is_evicted_first_and_not_counted():
    # A (6 tokens, 4-token blocks) holds a named block and a partly filled one; after A finishes, B
    # takes all 4 blocks: the 2 never used, A's partly filled last block (not cached: no eviction),
    # then A's first block (cached: one eviction), as a block-per-block cache evicts them.
    content = _content([6, 16], [0, 0], [[], []], [0, 1], [0, 0], [0, 0])
    apc = _cache(content, 0, 4, 4, 2, 20)
    hit_buf = np.zeros(4, np.int64)
    for k, (req, tokens) in enumerate([(0, 6), (1, 16)]):
        hits, key = px.apc_lookup_nb(apc, 0, req, tokens, 4, hit_buf)
        assert hits == 0
        px.apc_start_nb(apc, 0, k, req, 4, hit_buf, hits, key)
        px.apc_allocate_nb(apc, 0, k, -(-tokens // 4))
        px.apc_hash_full_nb(apc, 0, k, req, tokens, 4)
        if req == 0:
            assert px.apc_release_nb(apc, 0, k) == 2
            assert apc.rep[0, px.EVICTIONS] == 0
    assert apc.rep[0, px.EVICTIONS] == 1
