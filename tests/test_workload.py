import numpy as np
import pytest

from fastsim import config as C
from fastsim.config import load_config
from fastsim.errors import FastsimError
from fastsim.workload import generate_workload
from fastsim.workload.distributions import sample_lengths
from fastsim.workload.generate import split_requests


def wl(clients, **kw):
    return C.Workload(clients=clients, **kw)


def client(**kw):
    base = dict(prompt_tokens={"dist": "constant", "value": 10}, output_tokens={"dist": "constant", "value": 5})
    return C.Client(**(base | kw))


def test_lognormal_is_given_in_tokens_not_log_space():
    spec = C.Lognormal(dist="lognormal", mean=1000, std=500)
    x = sample_lengths(spec, 200_000, np.random.default_rng(0), "f")
    assert x.mean() == pytest.approx(1000, rel=0.02)
    assert x.std() == pytest.approx(500, rel=0.03)
    assert x.max() < 20_000  # the predecessor's log-space reading gave 10^25-token prompts


@pytest.mark.parametrize("spec,mean,std", [
    (C.Gamma(dist="gamma", mean=300, std=100), 300, 100),
    (C.Uniform(dist="uniform", low=10, high=20), 15, np.sqrt((11**2 - 1) / 12)),
    (C.Normal(dist="normal", mean=500, std=50), 500, 50),
    (C.Weibull(dist="weibull", shape=2.0, scale=100), 100 * 0.886227, 100 * np.sqrt(1 - 0.886227**2 * 4 / np.pi * np.pi / 4)),
])
def test_distribution_moments(spec, mean, std):
    x = sample_lengths(spec, 200_000, np.random.default_rng(1), "f")
    assert x.mean() == pytest.approx(mean, rel=0.02)
    assert x.std() == pytest.approx(std, rel=0.05)


def test_truncated_normal_and_bounds():
    spec = C.Normal(dist="normal", mean=10, std=50, min=5, max=40)
    x = sample_lengths(spec, 10_000, np.random.default_rng(0), "f")
    assert x.min() >= 5 and x.max() <= 40
    # Truncation resamples: no pile-up at the bounds as clipping would give.
    assert (x == 5).mean() < 0.05


def test_pareto_minimum_and_mixture_weights():
    par = C.Pareto(dist="pareto", shape=3.0, scale=100)
    x = sample_lengths(par, 50_000, np.random.default_rng(0), "f")
    assert x.min() >= 100 and x.mean() == pytest.approx(150, rel=0.03)  # alpha xm / (alpha - 1)
    mix = C.Mixture(dist="mixture", components=[
        {"weight": 3, "spec": {"dist": "constant", "value": 10}},
        {"weight": 1, "spec": {"dist": "constant", "value": 1000}}])
    y = sample_lengths(mix, 40_000, np.random.default_rng(0), "f")
    assert (y == 10).mean() == pytest.approx(0.75, abs=0.01)


def test_empirical_from_builtin_dataset_and_file(tmp_path):
    spec = C.Empirical(dist="empirical", dataset="sharegpt", column="prompt_tokens")
    x = sample_lengths(spec, 50_000, np.random.default_rng(0), "f")
    assert x.mean() == pytest.approx(2340, rel=0.03)  # the ShareGPT file's mean prompt
    f = tmp_path / "l.csv"
    f.write_text("n\n7\n9\n")
    y = sample_lengths(C.Empirical(dist="empirical", file=str(f), column="n"), 1000, np.random.default_rng(0), "f")
    assert set(y.tolist()) == {7, 9}
    with pytest.raises(FastsimError, match="no column 'm'"):
        sample_lengths(C.Empirical(dist="empirical", file=str(f), column="m"), 10, np.random.default_rng(0), "x")
    f.write_text("n\n7\n-3\n")
    with pytest.raises(FastsimError, match="row 2"):
        sample_lengths(C.Empirical(dist="empirical", file=str(f), column="n"), 10, np.random.default_rng(0), "x")


def test_arrival_processes():
    rng_rate = 5.0
    for process, cv in (("poisson", 1.0), ("gamma", 3.0), ("constant", 0.0)):
        arr = {"process": process, "rate": rng_rate} | ({"cv": cv} if process == "gamma" else {})
        w = generate_workload(wl([client(arrival=arr)], num_requests=20_000), seed=3)
        gaps = np.diff(w.arrival_s)
        assert gaps.mean() == pytest.approx(1 / rng_rate, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, abs=0.1)
    w = generate_workload(wl([client(arrival={"process": "batch"})], num_requests=8), seed=0)
    assert (w.arrival_s == 0).all() and len(w) == 8


def _vllm_send_times(n, rate, burstiness, seed, legacy):
    """vLLM's own loop, written as vllm/benchmarks/serve.py (get_request, since PR 21108) and
    benchmark_serving.py before it do: the global generator seeded, one scalar gamma draw per
    request, Python float sums, then (since PR 21108) the rescale to n / rate."""
    np.random.seed(seed)
    theta = 1.0 / (rate * burstiness)
    delays = [np.random.gamma(shape=burstiness, scale=theta) for _ in range(n)]
    if legacy:  # the first request at once, each later one after a gap
        out, t = [], 0.0
        for d in delays:
            out.append(t)
            t += d
        return out
    for i in range(1, n):
        delays[i] += delays[i - 1]
    factor = (n / rate) / delays[-1]
    return [d * factor for d in delays]


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("arrival", [{"process": "poisson", "rate": 4.0},
                                     {"process": "gamma", "rate": 2.5, "burstiness": 0.5}])
def test_vllm_bench_schedule_is_vllms_send_times_to_the_bit(arrival, legacy):
    schedule = "vllm_bench_legacy" if legacy else "vllm_bench"
    a = arrival | {"schedule": schedule, "seed": 7}
    w = generate_workload(wl([client(arrival=a)], num_requests=300), seed=123)  # the arrival's seed wins
    want = _vllm_send_times(300, arrival["rate"], arrival.get("burstiness", 1.0), 7, legacy)
    assert np.array_equal(np.sort(w.arrival_s), np.array(want))
    if not legacy:
        assert w.arrival_s.max() == pytest.approx(300 / arrival["rate"], rel=1e-12)
    # Without its own seed the schedule takes the run's, as vllm bench serve takes --seed.
    w0 = generate_workload(wl([client(arrival={"process": "poisson", "rate": 4.0, "schedule": schedule})],
                              num_requests=50), seed=7)
    assert np.array_equal(w0.arrival_s, np.array(_vllm_send_times(50, 4.0, 1.0, 7, legacy)))


def test_vllm_bench_schedule_needs_a_request_count_and_gamma_one_shape():
    a = {"process": "poisson", "rate": 4.0, "schedule": "vllm_bench"}
    with pytest.raises(FastsimError, match=r"clients.0.arrival.schedule: vllm_bench .*num_requests"):
        generate_workload(wl([client(arrival=a)], duration_s=10), seed=0)
    with pytest.raises(ValueError, match="exactly one of 'cv' or 'burstiness'"):
        client(arrival={"process": "gamma", "rate": 1.0, "cv": 2.0, "burstiness": 0.25})
    # burstiness is the gamma shape: cv = 1 / sqrt(burstiness)
    w = generate_workload(wl([client(arrival={"process": "gamma", "rate": 5.0, "burstiness": 0.25})],
                             num_requests=20_000), seed=1)
    gaps = np.diff(w.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, abs=0.15)


def test_duration_mode_and_sorting():
    w = generate_workload(wl([client(arrival={"process": "poisson", "rate": 10.0})], duration_s=100), seed=0)
    assert 850 < len(w) < 1150 and w.arrival_s.max() < 100
    assert (np.diff(w.arrival_s) >= 0).all()


def test_split_by_rate_and_own_counts():
    cs = [client(arrival={"process": "poisson", "rate": 3.0}), client(arrival={"process": "poisson", "rate": 1.0}),
          client(arrival={"process": "batch"}, num_requests=7)]
    assert split_requests(107, cs) == [75, 25, 7]


def test_same_seed_same_workload_different_seed_differs():
    cfg = load_config(None)
    a, b = generate_workload(cfg.workload, 0), generate_workload(cfg.workload, 0)
    c = generate_workload(cfg.workload, 1)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert not np.array_equal(a.arrival_s, c.arrival_s)


def test_workload_config_errors():
    with pytest.raises(FastsimError, match="num_requests or duration_s"):
        load_config(None, ["workload.duration_s=10"])
    with pytest.raises(FastsimError, match=r"clients.0.*prompt_tokens"):
        load_config(None, ["workload.clients.0.dataset=null"])


def test_block_ids_follow_their_requests_through_the_arrival_sort(tmp_path):
    from pathlib import Path
    fix = Path(__file__).parent / "fixtures" / "mooncake_conversation_300.jsonl"
    cfg = load_config(None, ["workload.num_requests=null", f"workload.clients=[{{name: m, trace: {{format: mooncake, file: {fix}}}}}, "
                             "{name: s, num_requests: 50, arrival: {process: poisson, rate: 1.0}, "
                             "prompt_tokens: {dist: constant, value: 10}, output_tokens: {dist: constant, value: 5}}]"])
    w = generate_workload(cfg.workload, 0)
    from fastsim.workload.traces import read_trace
    rows = read_trace("mooncake", fix)
    assert len(w) == 350 and w.block_tokens == 512
    mooncake = np.flatnonzero(w.client == 0)
    for j, i in enumerate(mooncake[:40]):  # the trace's rows, in their own order, keep their ids
        assert w.block_ids[w.block_offsets[i]:w.block_offsets[i + 1]].tolist() == \
            rows.hash_ids[rows.hash_offsets[j]:rows.hash_offsets[j + 1]].tolist()
    synthetic = np.flatnonzero(w.client == 1)
    assert (w.block_offsets[synthetic + 1] == w.block_offsets[synthetic]).all()


def test_conversation_turns_extend_the_previous_prompt_and_answer():
    wl = C.Workload(num_requests=500, clients=[C.Client(
        arrival=C.Poisson(process="poisson", rate=2.0), system_prompt_tokens=300,
        prompt_tokens=C.Uniform(dist="uniform", low=10, high=100),
        output_tokens=C.Uniform(dist="uniform", low=5, high=50),
        conversation=C.Conversation(turns=C.Uniform(dist="uniform", low=1, high=6),
                                    think_time_s=C.ConstantTime(dist="constant", value=3.0)))])
    w = generate_workload(wl, seed=3)
    assert len(w) == 500
    assert (np.diff(w.arrival_s) >= 0).all()
    for i in range(len(w)):
        j = w.next_turn[i]
        if j < 0:
            continue
        assert w.session[j] == w.session[i] and w.turn[j] == w.turn[i] + 1
        assert w.think_s[j] == 3.0 and w.arrival_s[j] >= w.arrival_s[i] + 3.0
        user = w.prompt_tokens[j] - w.prompt_tokens[i] - w.output_tokens[i]
        assert 10 <= user <= 100  # previous prompt + previous answer + new user tokens
        assert w.seq_id[j] == w.seq_id[i]
    first = w.turn == 0
    assert (w.think_s[first] == -1.0).all() and (w.think_s[~first] == 3.0).all()
    assert ((w.prompt_tokens[first] - 300 >= 10) & (w.prompt_tokens[first] - 300 <= 100)).all()
    assert (w.seq_id[first] == np.flatnonzero(first)).all()  # a session's sequence is its first row
    assert (w.shared_tokens == 300).all()
    sessions, counts = np.unique(w.session, return_counts=True)
    assert counts.max() <= 6 and sessions.size == (w.next_turn < 0).sum()


def test_conversation_workload_by_duration_keeps_every_turn_of_its_sessions():
    wl = C.Workload(duration_s=50.0, clients=[C.Client(
        arrival=C.ConstantRate(process="constant", rate=1.0), prompt_tokens=C.Constant(dist="constant", value=10),
        output_tokens=C.Constant(dist="constant", value=5),
        conversation=C.Conversation(turns=C.Constant(dist="constant", value=3),
                                    think_time_s=C.ExponentialTime(dist="exponential", mean=2.0)))])
    w = generate_workload(wl, seed=0)
    assert len(w) == 150 and sorted(set(w.prompt_tokens.tolist())) == [10, 25, 40]


def test_arrivals_beyond_what_float_seconds_resolve_are_refused():
    with pytest.raises(FastsimError, match=r"clients.0: its requests arrive over .* raise its arrival rate"):
        generate_workload(wl([client(arrival={"process": "poisson", "rate": 1e-300})], num_requests=20), seed=0)
    with pytest.raises(ValueError, match="less than or equal to 1000000000"):
        wl([client(arrival={"process": "poisson", "rate": 1.0})], duration_s=1e12)
