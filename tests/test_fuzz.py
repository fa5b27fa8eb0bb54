"""Property and fuzz tests: random valid configs through every framework and mode, checked against
invariants after each run; random invalid configs and damaged trace files, each of which must end in
one clean error line (FastsimError), never another exception or a hang.

HYPOTHESIS_PROFILE=ci runs a few dozen examples (CI); HYPOTHESIS_PROFILE=long runs 2,000 by hand:
  HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_fuzz.py
"""
import copy
import math

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastsim.config import build_config
from fastsim.errors import FastsimError
from fastsim.simulation import simulate

FRAMEWORKS = ("vllm", "sglang", "trtllm", "dynamo")


@st.composite
def valid_configs(draw):
    framework = draw(st.sampled_from(FRAMEWORKS))
    model = draw(st.sampled_from(["meta-llama/Meta-Llama-3-8B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen1.5-MoE-A2.7B"]))
    max_len = draw(st.sampled_from([2048, 4096]))
    engine = {"framework": framework, "max_model_len": max_len,
              "max_num_seqs": draw(st.sampled_from([2, 8, 64])),
              "max_num_batched_tokens": draw(st.sampled_from([max_len, 8192])),
              "num_gpu_blocks_override": draw(st.sampled_from([None, 300, 2000])),
              "data_parallel_size": draw(st.integers(1, 3))}
    if framework == "vllm":
        engine["enable_prefix_caching"] = draw(st.booleans())
        engine["scheduler"] = draw(st.sampled_from(["v1", "v1", "v0"]))
        if engine["scheduler"] == "v0":
            engine["enable_prefix_caching"] = False
        else:
            engine["enable_chunked_prefill"] = draw(st.booleans())
            engine["long_prefill_token_threshold"] = draw(st.sampled_from([0, 0, 256]))
    if framework == "trtllm":
        engine["capacity_scheduler_policy"] = draw(st.sampled_from(["guaranteed_no_evict", "max_utilization"]))
    if framework in ("vllm", "trtllm") and draw(st.integers(0, 4)) == 0:
        engine["speculative_config"] = {"method": "ngram", "num_speculative_tokens": draw(st.integers(1, 4)),
                                        "acceptance_rate": draw(st.floats(0, 1))}
    if framework == "sglang" and engine["num_gpu_blocks_override"]:
        # SGLang's pages are single tokens: the same small caches in tokens, not 300 tokens that no
        # max_model_len fits (those configs were refused, and passed without testing anything)
        engine["num_gpu_blocks_override"] *= 16
    engine = {k: v for k, v in engine.items() if v is not None}
    n = draw(st.integers(1, 60))
    client = {"arrival": draw(st.sampled_from([{"process": "poisson", "rate": 20.0},
                                               {"process": "gamma", "rate": 5.0, "cv": 3.0},
                                               {"process": "batch"}])),
              "prompt_tokens": {"dist": "uniform", "low": 1, "high": draw(st.sampled_from([50, 1500, 5000]))},
              "output_tokens": {"dist": "uniform", "low": 1, "high": draw(st.sampled_from([2, 300]))},
              "system_prompt_tokens": draw(st.sampled_from([0, 0, 200]))}
    if draw(st.integers(0, 5)) == 0 and framework != "trtllm":
        client["conversation"] = {"turns": {"dist": "uniform", "low": 1, "high": 3},
                                  "think_time_s": {"dist": "exponential", "mean": 1.0}}
    router = draw(st.sampled_from(["round_robin", "least_requests", "least_kv", "random", "session_affinity"]))
    cluster = {"router": router}
    if framework != "sglang" and "conversation" not in client and engine.get("scheduler") != "v0" \
            and draw(st.integers(0, 4)) == 0:
        engine.pop("enable_prefix_caching", None)
        cluster["disaggregation"] = {"prefill": {"count": draw(st.integers(1, 2))},
                                     "decode": {"count": draw(st.integers(1, 2))},
                                     "kv_transfer": {"link": draw(st.sampled_from(["nvlink", "ethernet"])),
                                                     "overlap": draw(st.booleans())}}
    raw = {"model": model, "engine": engine, "cluster": cluster,
           "simulation": {"seed": draw(st.integers(0, 3))},
           "workload": {"num_requests": n, "clients": [client]}}
    if draw(st.integers(0, 5)) == 0:
        raw["simulation"]["max_sim_time_s"] = draw(st.sampled_from([0.5, 5.0]))
    return raw


def check_invariants(raw: dict, result) -> None:
    t = result.requests.to_pandas()
    n = raw["workload"]["num_requests"]
    assert len(t) == n and t.request_id.nunique() == n
    assert set(t.status) <= {"finished", "rejected", "unfinished"}
    done = t[t.status == "finished"]
    assert (done.generated_tokens == done.output_tokens).all()
    for a, b in (("arrival_s", "first_scheduled_s"), ("first_scheduled_s", "first_token_s"),
                 ("first_token_s", "finish_s")):
        assert (done[a] <= done[b] + 1e-12).all(), (a, b)
    rej = t[t.status == "rejected"]
    assert rej.first_token_s.isna().all() and rej.reject_reason.notna().all()
    s = result.summary
    if "max_sim_time_s" not in raw["simulation"]:
        assert s["unfinished"] == 0  # nothing limits the run, so every admitted request must end
    for r in s["replicas"]:
        assert 0 <= r["peak_kv_blocks_used"] <= r["num_gpu_blocks"]
        if s["unfinished"] == 0:
            assert r["kv_blocks_in_use_at_end"] == 0  # every block returned
    assert s["completed"] + s["rejected"] + s["unfinished"] == s["measured_requests"]


def run(raw: dict):
    try:
        return simulate(build_config(raw))
    except FastsimError:
        return None  # a combination the engine refuses with a message (e.g. too long for the cache)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(valid_configs())
def test_random_valid_configs_keep_the_invariants_in_both_modes(raw):
    fast = run(raw)
    assume(fast is not None)  # a refused combination tests nothing here: draw another
    check_invariants(raw, fast)
    exact_raw = copy.deepcopy(raw)
    exact_raw["simulation"]["mode"] = "exact"
    exact = simulate(build_config(exact_raw))
    check_invariants(raw, exact)
    a, b = fast.requests.to_pandas(), exact.requests.to_pandas()
    assert list(a.status) == list(b.status) and list(a.replica) == list(b.replica)
    np.testing.assert_allclose(a.finish_s.fillna(-1), b.finish_s.fillna(-1), rtol=1e-9, atol=1e-9)


BASE = {"model": "meta-llama/Meta-Llama-3-8B",
        "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 8192, "block_size": 16, "tensor_parallel_size": 1,
                   "gpu_memory_utilization": 0.9, "max_model_len": 4096, "enable_prefix_caching": True},
        "cluster": {"router": "round_robin"}, "simulation": {"seed": 0, "max_sim_time_s": 60.0},
        "slo": {"ttft_ms": 500},
        "workload": {"num_requests": 20, "clients": [{
            "arrival": {"process": "poisson", "rate": 5.0},
            "prompt_tokens": {"dist": "lognormal", "mean": 300, "std": 200, "max": 3000},
            "output_tokens": {"dist": "uniform", "low": 10, "high": 100}, "system_prompt_tokens": 100}]}}

BAD_VALUES = [-1, 0, -0.5, math.nan, math.inf, -math.inf, 10**15, 1e300, "", "abc", [], {}, None, True,
              [1, 2], {"x": 1}, "1e9"]


def leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaf_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaf_paths(v, (*prefix, i))
    else:
        yield prefix


PATHS = list(leaf_paths(BASE))


def set_at(raw, path, value):
    node = raw
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(PATHS), st.sampled_from(BAD_VALUES), st.booleans())
def test_random_invalid_configs_end_in_one_clean_line(path, value, unknown_key):
    raw = copy.deepcopy(BASE)
    set_at(raw, path, value)
    if unknown_key:
        set_at(raw, (*path[:-1], "not_a_key"), 1)
    try:
        result = simulate(build_config(raw))
    except FastsimError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg
        return
    # Accepted: then the result must be whole (e.g. a harmless value such as a large max_num_seqs).
    check_invariants(raw, result) if isinstance(raw["workload"].get("num_requests"), int) else None


TRACES = {
    "azure": ("trace.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{i:02d}.0000000,{100 + i},{10 + i}\n" for i in range(30)), ("ContextTokens", "Context")),
    "mooncake": ("trace.jsonl", "".join(
        f'{{"timestamp": {i * 100}, "input_length": {600 + i}, "output_length": {5 + i}, "hash_ids": [{i}, {i + 1}]}}\n'
        for i in range(30)), ("input_length", "input_len")),
    "vidur": ("trace.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n" + "".join(
        f"{i * 0.1:.1f},{100 + i},{10 + i}\n" for i in range(30)), ("num_decode_tokens", "decode")),
}


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], deadline=None)
@given(st.sampled_from(sorted(TRACES)), st.floats(0, 1), st.sampled_from(["cut", "garbage", "header"]))
def test_damaged_trace_files_name_the_file(tmp_path, fmt, where, damage):
    name, text, (column, wrong) = TRACES[fmt]
    cut = int(where * len(text))
    if damage == "cut":
        text = text[:cut]
    elif damage == "garbage":
        text = text[:cut] + "\x00,,x;{\n" + text[cut:]
    else:
        text = text.replace(column, wrong)
    path = tmp_path / name
    path.write_text(text)
    raw = copy.deepcopy(BASE)
    raw["workload"] = {"clients": [{"trace": {"format": fmt, "file": str(path)}}]}
    try:
        result = simulate(build_config(raw))
    except FastsimError as e:
        assert "\n" not in str(e) and name in str(e)
        return
    assert len(result.requests) > 0
