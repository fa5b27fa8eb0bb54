"""Fast mode's closed form: the time, token gaps, KV blocks and timeline rows of a run of k decode-only
iterations of a replica's steady batch, summed without stepping them (attention time, smooth in the
batch's context, is fitted by a quadratic through the run's first, middle and last steps)."""
from __future__ import annotations

import numpy as np
from numba import njit

from fastsim.engine import enums as E
from fastsim.engine.bundles import Batch
from fastsim.engine.batch_nb import div_pow2_nb, itl_bin_low_nb, itl_bin_nb, mod_pow2_nb, timeline_row_nb
from fastsim.engine.cost_nb import (CPU_OVERLAP, LAYERS, SPEC_DRAFT_ATTN, SPEC_EXPECTED, SPEC_TOKENS, cache_attention_coefs_nb,
                                    cache_attention_nb, spec_decode_attention_nb)

BIN_EACH_MAX = 32  # runs up to this many iterations bin each gap; longer ones solve for the bin edges


# -- runs of decode-only iterations in closed form --------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def attention_coefs_nb(p):
    """What attention_nb needs of the cost parameters, taken once per run."""
    return p[LAYERS], cache_attention_coefs_nb(p), p[SPEC_TOKENS], p[SPEC_DRAFT_ATTN], p[SPEC_EXPECTED]


@njit(cache=True, error_model="numpy", inline="always")
def attention_nb(c, n, keys):
    """All layers' attention time of an iteration of n decodes over `keys` context tokens (c:
    attention_coefs_nb): what stage_time_nb charges for it beside decode_only_nb, bit for bit
    without speculation (with it, to rounding: stage_time_nb divides the step's sum by E)."""
    layers, cache, spec_tokens, draft_attn, expected = c
    if spec_tokens == 0.0:
        return layers * cache_attention_nb(cache, keys, keys, n)
    return spec_decode_attention_nb(cache, layers, spec_tokens, draft_attn, n, keys) / expected


@njit(cache=True, error_model="numpy", inline="always")
def fit_nb(c, n, keys0, grow, g0, N):
    """Attention time of n decodes over keys0 + grow*u context tokens, u = 0..N, as the quadratic
    g0 + a1 u + a2 u^2 through u = 0, N/2, N (exact at N <= 2); g0 = attention_nb(c, n, keys0), taken
    from the caller, which fits a run again with a smaller N when it misses: computed in here, LLVM
    hoists it out of that loop, and with it the soft roofline's pow call that only overlap != 4 needs.
    Returns (a1, a2, ok), ok: it matches the function at a quarter point to 1e-13 relative."""
    if N == 0:
        return 0.0, 0.0, True
    inv = 1.0 / N  # (computed beside the evaluations, not after them)
    gN = attention_nb(c, n, keys0 + grow * N)
    if N == 1:
        return gN - g0, 0.0, True
    gM = attention_nb(c, n, keys0 + grow * (N * 0.5))
    a2 = 4.0 * ((g0 + gN) * 0.5 - gM) * (inv * inv)
    a1 = (gN - g0) * inv - a2 * N
    if N == 2:
        return a1, a2, True
    u = max(1, N // 4)
    gq = attention_nb(c, n, keys0 + grow * u)
    return a1, a2, abs(g0 + a1 * u + a2 * u * u - gq) <= 1e-13 * gq


@njit(cache=True, error_model="numpy", inline="always")
def power_sums_nb(m):
    """Sums of u^0..u^4 over u = 0..m, as floats (to an ulp or two: the thirds and fifteenths are
    multiplications, as a division would lengthen every run's chain of dependent arithmetic)."""
    f = float(m)
    h = f * (f + 1.0) * 0.5
    return (f + 1.0, h, h * (2.0 * f + 1.0) * (1.0 / 3.0), h * h,
            h * (2.0 * f + 1.0) * (3.0 * f * f + 3.0 * f - 1.0) * (1.0 / 15.0))


@njit(cache=True, error_model="numpy")
def gaps_nb(p, cpu, gpu0, a1, a2, kmax):
    """(kmax, b0, t1, t2): the gaps b0 + t1 u + t2 u^2 between a run's iterations, whose GPU time is
    gpu0 + a1 u + a2 u^2 and CPU time `cpu`, and how many of its kmax iterations share that form.
    In series they add. Overlapped (cpu_in_series_nb) an iteration takes the longer: the GPU's
    where it is longer from the start (it only grows), else the CPU's until the GPU's passes it,
    where the run ends for the next to start over (a run that is not growing steps one by one)."""
    if p[CPU_OVERLAP] == 0.0:
        return kmax, cpu + gpu0, a1, a2
    N = kmax - 1
    if a1 < 0.0 or a1 + 2.0 * a2 * N < 0.0:
        return 1, max(cpu, gpu0), 0.0, 0.0
    if cpu <= gpu0:
        return kmax, gpu0, a1, a2
    if gpu0 + a1 * N + a2 * N * N < cpu:
        return kmax, cpu, 0.0, 0.0
    # the last u whose GPU time is under the CPU's: near the quadratic's root, then exactly
    d = gpu0 - cpu
    x = (-a1 + np.sqrt(a1 * a1 - 4.0 * a2 * d)) / (2.0 * a2) if a2 > 0.0 else -d / a1
    m = min(N, max(0, int(np.ceil(x)) - 1))
    while m > 0 and gpu0 + a1 * m + a2 * m * m >= cpu:
        m -= 1
    while m < N and gpu0 + a1 * (m + 1) + a2 * (m + 1) * (m + 1) < cpu:
        m += 1
    return m + 1, cpu, 0.0, 0.0


@njit(cache=True, error_model="numpy", inline="always")
def elapsed_nb(b0, a1, a2, j):
    """Sum of the first j gaps b0 + a1 u + a2 u^2 (u = 0..j-1)."""
    if j <= 0:
        return 0.0
    _, p1, p2, _, _ = power_sums_nb(j - 1)
    return j * b0 + a1 * p1 + a2 * p2


@njit(cache=True, error_model="numpy", inline="always")
def runs_nb(t, b0, a1, a2, j, total, t_arrival, max_time_s):
    """Whether a run's j-th iteration from t runs: it is the call's first or the one before it ends
    before the next arrival, and it ends within the time limit (an infinite bound needs no sum)."""
    return (total + j == 1 or t_arrival == np.inf or t + elapsed_nb(b0, a1, a2, j - 1) < t_arrival) and \
        (max_time_s == np.inf or t + elapsed_nb(b0, a1, a2, j) <= max_time_s)


@njit(cache=True, error_model="numpy")
def timeline_rows_nb(timeline, tl_state, r, t, b0, a1, a2, k, n, phase, D, bs, used, waiting, running):
    """The timeline's rows of a run's k decode-only iterations from t, as exact mode writes one at
    each (its blocks in use after the iteration takes its new ones)."""
    row_n = tl_state[E.LS_ROWS]
    f = mod_pow2_nb(D, bs)
    for u in range(k):
        used += phase[r, f]
        f += 1
        if f == bs:
            f = 0
        timeline_row_nb(timeline, row_n, t + elapsed_nb(b0, a1, a2, u), b0 + a1 * u + a2 * u * u,
                        Batch(n, 0.0, 0, 0, 0.0, 0.0), used, waiting, running, 0, r)
        row_n += 1
    tl_state[E.LS_ROWS] = row_n


@njit(cache=True, error_model="numpy", inline="always")
def last_run_nb(t, b0, a1, a2, kmax, total, t_arrival, max_time_s):
    """How many of a run's kmax iterations from t run (runs_nb is monotone in j: the largest j that
    does, 0 if none). Most runs end at a finish, not an arrival: kmax is tried first."""
    if runs_nb(t, b0, a1, a2, kmax, total, t_arrival, max_time_s):
        return kmax
    # Every gap is at least b0, so no more than (time left) / b0 + 1 iterations fit: start there
    # (+1 for rounding) and step to the last that runs, about once, where a bisection would take
    # log2(kmax) steps whose branches are coin flips. (The start only saves steps: from any start
    # the steps find the same iteration.)
    k = kmax - 1
    fits = min(t_arrival - t, max_time_s - t + b0) / b0
    if k > 1 and fits < k - 2.0:  # (never past kmax - 1, nor up from 0)
        k = int(fits) + 2 if fits > 0.0 else 1
    if k > 0 and runs_nb(t, b0, a1, a2, k, total, t_arrival, max_time_s):
        while k + 1 < kmax and runs_nb(t, b0, a1, a2, k + 1, total, t_arrival, max_time_s):
            k += 1
        return k
    k -= 1
    while k > 0 and not runs_nb(t, b0, a1, a2, k, total, t_arrival, max_time_s):
        k -= 1
    return max(k, 0)


@njit(cache=True, error_model="numpy", inline="always")
def blocks_used_nb(phase, r, D, bs, n, k):
    """Blocks the lazy decoders take over the k iterations from clock D."""
    cycles = div_pow2_nb(k, bs)
    used = cycles * n
    f = mod_pow2_nb(D + cycles * bs, bs)
    rest = k - cycles * bs
    if bs <= 32:
        # Every phase, masked to the `rest` from f on: a loop of fixed length (vectorised), where
        # one of `rest` steps would mispredict its exit (callgrind: 13% of mispredicts).
        for g in range(bs):
            used += phase[r, g] * (mod_pow2_nb(g - f, bs) < rest)
        return used
    for _ in range(rest):  # the phase counts up and wraps, not a modulo a step
        used += phase[r, f]
        f += 1
        if f == bs:
            f = 0
    return used


@njit(cache=True, error_model="numpy", inline="always")
def blocks_fit_nb(phase, r, D, bs, n, free, kmax):
    """The most iterations (<= kmax) from clock D whose block allocations fit in `free`."""
    cyc = div_pow2_nb(kmax, bs)
    if (cyc + 1) * n <= free:  # each decoder takes at most one block per block_size iterations
        return kmax
    if cyc * n > free:  # (a division only when the blocks run out first)
        cyc = free // n
    used = cyc * n
    j = cyc * bs
    f = mod_pow2_nb(D + j, bs)
    while j < kmax:
        nd = phase[r, f]
        if used + nd > free:
            break
        used += nd
        j += 1
        f += 1
        if f == bs:
            f = 0
    return j


@njit(cache=True, error_model="numpy", inline="always")
def bin_run_nb(itl_acc, b0, a1, a2, k, count):
    """k gaps g(u) = b0 + a1 u + a2 u^2 (u = 0..k-1, non-decreasing), each `count` times, into the
    histogram. Short runs bin each gap: a few instructions and no branch a gap. Longer ones go bin by
    bin, each bin's last gap found by solving g(u) = the next bin's lower edge (a long run crosses a
    few edges: bins are 0.07% wide), where a bisection took a coin-flip branch a level. The solution
    is checked against g itself, so each gap lands where binning it alone puts it (bins
    non-decreasing in u). Solving every run's edges, with an earlier square-root solve, measured ~5%
    slower than binning short runs' gaps; in wall time binning is hidden behind the rest of a run
    (leaving it out altogether measured no faster), so this saves callgrind's mispredicts only."""
    itl_hist = itl_acc.hist
    if k <= BIN_EACH_MAX:
        for u in range(k):
            itl_hist[itl_bin_nb(b0 + a1 * u + a2 * u * u)] += count
        return
    lo = 0
    b = itl_bin_nb(b0)
    top = itl_bin_nb(b0 + a1 * (k - 1) + a2 * (k - 1) * (k - 1))
    # g(u) - b0 <= u (a1 + a2 (k - 1)) on the run: solving that line for an edge gives a u at or
    # just before g's own crossing (the curvature is tiny); the checks below step to the exact one.
    inv_slope = 1.0 / (a1 + a2 * (k - 1))
    while b < top:
        x = (itl_bin_low_nb(b + 1) - b0) * inv_slope
        u = k - 1
        if x < u:  # (false for nan and inf too)
            u = max(int(np.ceil(x)), lo + 1)
        while u > lo + 1 and itl_bin_nb(b0 + a1 * (u - 1) + a2 * (u - 1) * (u - 1)) > b:
            u -= 1
        nb = itl_bin_nb(b0 + a1 * u + a2 * u * u)
        while nb <= b:
            u += 1
            nb = itl_bin_nb(b0 + a1 * u + a2 * u * u)
        itl_hist[b] += (u - lo) * count
        lo = u
        b = nb
    itl_hist[b] += (k - lo) * count
