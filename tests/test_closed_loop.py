"""The closed-loop client (`vllm bench serve --max-concurrency N`), and an online client's next
request leaving when it has its answer."""
import numpy as np
import pytest

from fastsim.config import build_config
from fastsim.errors import FastsimError
from fastsim.simulation import simulate


def config(arrival, n=120, **client):
    return build_config({"workload": {"num_requests": n, "clients": [{
        "arrival": arrival, "prompt_tokens": {"dist": "uniform", "low": 50, "high": 800},
        "output_tokens": {"dist": "uniform", "low": 5, "high": 300}, **client}]}})


def in_flight(t):
    """Requests in flight at each instant a request is sent (every send and finish of that instant
    counted: two slots freed at once are refilled at once)."""
    arrive, finish = np.sort(t["arrival_s"].to_numpy()), np.sort(t["finish_s"].to_numpy())
    times = np.unique(arrive)
    return np.searchsorted(arrive, times, "right") - np.searchsorted(finish, times, "right")


def test_closed_loop_keeps_max_concurrency_requests_in_flight():
    t = simulate(config({"process": "closed_loop", "max_concurrency": 8})).requests.to_pandas()
    assert (t["status"] == "finished").all() and len(t) == 120
    assert (t["arrival_s"].nsmallest(8) == 0).all()
    # every later request leaves the client the moment an earlier one's answer is back
    later = np.sort(t["arrival_s"].to_numpy())[8:]
    finishes = np.sort(t["finish_s"].to_numpy())
    assert np.isin(later, finishes).all()
    assert (in_flight(t) == 8).all()  # as vLLM's semaphore: 8 in flight whenever a request is sent


def test_an_online_turn_leaves_when_the_answer_is_back():
    """A conversation's next turn comes its think time after the client has the answer, which the
    API server hands over after the engine finishes: the engine sees it think + API later."""
    t = simulate(config({"process": "poisson", "rate": 2.0}, n=40,
                        conversation={"turns": {"dist": "constant", "value": 4},
                                      "think_time_s": {"dist": "constant", "value": 1.5}})).requests.to_pandas()
    t = t.sort_values(["session", "turn"])
    gaps = t["arrival_s"].to_numpy()[1:] - t["finish_s"].to_numpy()[:-1]
    same = t["session"].to_numpy()[1:] == t["session"].to_numpy()[:-1]
    assert np.allclose(gaps[same], 1.5, atol=1e-9)


def test_closed_loop_refuses_what_it_cannot_do():
    with pytest.raises(FastsimError, match="closed_loop sends each request"):
        config({"process": "closed_loop", "max_concurrency": 4},
               conversation={"turns": {"dist": "constant", "value": 2}, "think_time_s": {"dist": "constant", "value": 1}})
    with pytest.raises(FastsimError, match="not duration_s"):
        simulate(build_config({"workload": {"duration_s": 10, "clients": [{
            "arrival": {"process": "closed_loop", "max_concurrency": 4},
            "prompt_tokens": {"dist": "constant", "value": 10}, "output_tokens": {"dist": "constant", "value": 10}}]}}))
