"""The cluster kernel's routers against a naive twin: each replica is the one-replica reference
scheduler over the requests routed to it, and a state-dependent router is replayed arrival by
arrival from those replicas' own histories."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from fastsim.engine import enums as E
from test_engine import CM, OVERHEAD, run

SMALL = {"max_num_seqs": 4, "max_num_batched_tokens": 256, "block_size": 16, "num_blocks": 60}


def replica_reference(arrivals, prompts, outputs, members):
    """Finish times of the requests `members` (indices, in arrival order) on one replica alone."""
    if not members:
        return {}
    reqs, _ = ref.simulate_reference(CM, [arrivals[j] for j in members], [prompts[j] for j in members],
                                     [outputs[j] for j in members], overhead_s=OVERHEAD, chunked_prefill=True,
                                     **SMALL)
    return {j: q.finish for j, q in zip(members, reqs)}


def routed_reference(arrivals, prompts, outputs, replicas, policy, draw):
    """Which replica each request goes to, and when it finishes. Least-requests counts, at an
    arrival, the requests routed to each replica and not yet finished: a replica's past depends only
    on the requests that reached it before, so each count comes from its own reference run so far.
    Ties go to the lowest replica, as the kernel's scan does."""
    members = [[] for _ in range(replicas)]
    for i, t in enumerate(arrivals):
        if policy == E.ROUTE_ROUND_ROBIN:
            r = i % replicas
        elif policy == E.ROUTE_RANDOM:
            r = int(draw[i])
        else:
            outstanding = []
            for m in members:
                finish = replica_reference(arrivals, prompts, outputs, m)
                outstanding.append(sum(1 for j in m if finish[j] > t))
            r = int(np.argmin(outstanding))
        members[r].append(i)
    replica, finish = np.zeros(len(arrivals), int), np.zeros(len(arrivals))
    for r, m in enumerate(members):
        for j, f in replica_reference(arrivals, prompts, outputs, m).items():
            replica[j], finish[j] = r, f
    return replica, finish


workloads = st.integers(2, 18).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0, 2, allow_nan=False), min_size=n, max_size=n, unique=True),
    st.lists(st.integers(1, 200), min_size=n, max_size=n),
    st.lists(st.integers(1, 40), min_size=n, max_size=n)))


@settings(max_examples=25, deadline=None)
@given(wl=workloads, replicas=st.integers(2, 3),
       policy=st.sampled_from([E.ROUTE_ROUND_ROBIN, E.ROUTE_RANDOM, E.ROUTE_LEAST_REQUESTS]))
def test_routers_match_a_naive_twin_of_independent_replicas(wl, replicas, policy):
    arrivals, prompts, outputs = sorted(wl[0]), wl[1], wl[2]
    r = run(arrivals, prompts, outputs, replicas=replicas, policy=policy, **SMALL)
    draw = np.random.default_rng(0).integers(0, replicas, len(arrivals))  # run()'s draws
    replica, finish = routed_reference(arrivals, prompts, outputs, replicas, policy, draw)
    assert list(r.replica) == list(replica)
    np.testing.assert_allclose(r.finish_s, finish, rtol=1e-9, atol=1e-12)


def test_least_requests_by_hand():
    """Three requests at once on two replicas, then a fourth after the first two finish: 0 -> 0,
    1 -> 1, 2 -> 0 (tie, lowest), and the fourth goes to replica 1, which has nothing outstanding
    while replica 0 still serves request 2."""
    arrivals, prompts, outputs = [0.0, 0.0, 0.0, 0.5], [16, 16, 16, 16], [2, 2, 400, 2]
    r = run(arrivals, prompts, outputs, replicas=2, policy=E.ROUTE_LEAST_REQUESTS, **SMALL)
    assert list(r.replica) == [0, 1, 0, 1]
    assert r.finish_s[1] < 0.5 < r.finish_s[2]
