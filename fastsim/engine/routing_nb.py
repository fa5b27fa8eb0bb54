"""Routers: which replica an arriving request goes to (cluster.router; names in fastsim.policies)."""
from __future__ import annotations

import numpy as np
from numba import njit

from fastsim.engine import enums as E
from fastsim.engine import prefix_nb as px


# -- router ----------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def used_frac_nb(rep_int, free, r):
    """Replica r's KV blocks in use, as a fraction, as of its last decision (free blocks change
    only at decisions, so routers read them here rather than each decision storing it)."""
    return (rep_int[r, E.RI_NUM_BLOCKS] - free[r]) / rep_int[r, E.RI_NUM_BLOCKS]


@njit(cache=True, error_model="numpy")
def route_nb(policy, route_params, i, n_rep, rr_next, draw, session, session_replica, outstanding, free,
           apc, rep_int, prompt):
    if policy == E.ROUTE_ROUND_ROBIN:
        return rr_next % n_rep
    if policy == E.ROUTE_RANDOM:
        return draw[i]
    if policy == E.ROUTE_SESSION_AFFINITY and session[i] >= 0 and session_replica[session[i]] >= 0:
        return session_replica[session[i]]
    if policy == E.ROUTE_PREFIX_AWARE:
        return route_prefix_aware_nb(route_params, i, n_rep, outstanding, apc, rep_int, prompt)
    if policy == E.ROUTE_KV_AWARE:
        return route_kv_aware_nb(route_params, i, n_rep, outstanding, free, apc, rep_int, prompt)
    best = 0
    for r in range(1, n_rep):
        if policy == E.ROUTE_LEAST_KV:
            u, u_best = used_frac_nb(rep_int, free, r), used_frac_nb(rep_int, free, best)
            if u < u_best or (u == u_best and outstanding[r] < outstanding[best]):
                best = r
        elif outstanding[r] < outstanding[best]:
            best = r
    return best


@njit(cache=True, error_model="numpy")
def route_prefix_aware_nb(route_params, i, n_rep, outstanding, apc, rep_int, prompt):
    """SGLang router's cache-aware policy over the replicas' real caches: while the load is balanced,
    the replica caching the longest prefix of the prompt, if it covers at least cache_threshold of
    it; otherwise (or when the most loaded replica has more than balance_abs_threshold requests
    above the least, and more than balance_rel_threshold times as many) the least loaded."""
    least, most = 0, 0
    for r in range(1, n_rep):
        if outstanding[r] < outstanding[least]:
            least = r
        if outstanding[r] > outstanding[most]:
            most = r
    hi, lo = outstanding[most], outstanding[least]
    if hi - lo > route_params[E.RP_BALANCE_ABS] and hi > route_params[E.RP_BALANCE_REL] * lo:
        return least
    best, best_tokens = least, 0
    for r in range(n_rep):
        if rep_int[r, E.RI_APC]:
            bs = rep_int[r, E.RI_BLOCK_SIZE]
            tokens = px.apc_match_nb(apc, r, i, prompt[i], bs)[0] * bs
            if tokens > best_tokens or (tokens == best_tokens and outstanding[r] < outstanding[best]):
                best, best_tokens = r, tokens
    if best_tokens > 0 and best_tokens >= route_params[E.RP_CACHE_THRESHOLD] * prompt[i]:
        return best
    return least


@njit(cache=True, error_model="numpy")
def route_kv_aware_nb(route_params, i, n_rep, outstanding, free, apc, rep_int, prompt):
    """NVIDIA Dynamo's KV router at temperature 0: the replica with the lowest
    kv_overlap_score_weight x (prompt blocks it would prefill, after its cached prefix) + (blocks in
    use, with this request's); ties to fewer outstanding requests, then the lower index."""
    best, best_cost = 0, np.inf
    for r in range(n_rep):
        bs = rep_int[r, E.RI_BLOCK_SIZE]
        cached = px.apc_match_nb(apc, r, i, prompt[i], bs)[0] * bs if rep_int[r, E.RI_APC] else 0
        cost = (route_params[E.RP_OVERLAP_WEIGHT] * (prompt[i] - cached) / bs
                + used_frac_nb(rep_int, free, r) * rep_int[r, E.RI_NUM_BLOCKS] + prompt[i] / bs)
        if cost < best_cost or (cost == best_cost and outstanding[r] < outstanding[best]):
            best, best_cost = r, cost
    return best
