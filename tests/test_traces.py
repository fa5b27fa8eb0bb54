"""Trace replay: each format, its transformations, and clean errors for malformed files."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from fastsim.config import load_config
from fastsim.errors import FastsimError
from fastsim.simulation import simulate
from fastsim.workload import generate_workload
from fastsim.workload.traces import read_trace

FIX = Path(__file__).parent / "fixtures"


def trace_cfg(tmp_path, trace: dict, **client):
    d = {"model": "meta-llama/Meta-Llama-3-8B", "hardware": {"gpu": "H100-SXM"},
         "workload": {"clients": [{"name": "replay", "trace": trace, **client}]}}
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_azure_times_and_lengths():
    rows = read_trace("azure", FIX / "azure_conv_200.csv")
    assert len(rows) == 200
    # First two rows: 18:15:46.6805900 and 18:15:50.9951690 -> 4.314579 s apart; 374 / 44 tokens.
    assert rows.arrival_s[0] == 0 and rows.arrival_s[1] == pytest.approx(4.314579, abs=1e-9)
    assert rows.prompt_tokens[:2].tolist() == [374, 396] and rows.output_tokens[:2].tolist() == [44, 109]


def test_mooncake_times_lengths_and_block_ids():
    rows = read_trace("mooncake", FIX / "mooncake_conversation_300.jsonl")
    assert len(rows) == 300 and rows.hash_block_tokens == 512
    assert rows.prompt_tokens[0] == 6758 and rows.output_tokens[0] == 500
    first = rows.hash_ids[rows.hash_offsets[0]:rows.hash_offsets[1]]
    assert first.tolist() == list(range(14))  # 6758 tokens = 14 blocks of 512
    assert (np.diff(rows.arrival_s) >= 0).all()


def test_lengths_only_trace_takes_the_client_arrivals(tmp_path):
    p = trace_cfg(tmp_path, {"format": "vidur", "file": str(FIX / "etalon_sharegpt_200.csv")},
                  arrival={"process": "constant", "rate": 10.0})
    w = generate_workload(load_config(p).workload, 0)
    assert len(w) == 200 and w.arrival_s[1] == pytest.approx(0.1)
    assert w.prompt_tokens[:2].tolist() == [74, 290]
    with pytest.raises(FastsimError, match="no arrival times"):
        generate_workload(load_config(trace_cfg(tmp_path, {"format": "vidur",
                                                           "file": str(FIX / "etalon_sharegpt_200.csv")})).workload, 0)


def test_vidur_with_arrivals(tmp_path):
    f = tmp_path / "v.csv"
    f.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n1.5,10,3\n2.0,20,4\n")
    rows = read_trace("vidur", f)
    assert rows.arrival_s.tolist() == [0.0, 0.5] and rows.prompt_tokens.tolist() == [10, 20]


def test_window_speedup_rate_and_sample(tmp_path):
    full = read_trace("azure", FIX / "azure_conv_200.csv")
    base = {"format": "azure", "file": str(FIX / "azure_conv_200.csv")}
    w = generate_workload(load_config(trace_cfg(tmp_path, base | {"speedup": 2.0})).workload, 0)
    assert np.allclose(w.arrival_s, full.arrival_s / 2)
    w = generate_workload(load_config(trace_cfg(tmp_path, base | {"rate": 50.0})).workload, 0)
    assert (len(w) - 1) / w.arrival_s.max() == pytest.approx(50.0)
    w = generate_workload(load_config(trace_cfg(tmp_path, base | {"start_s": 10, "end_s": 20})).workload, 0)
    inside = (full.arrival_s >= 10) & (full.arrival_s < 20)
    assert len(w) == inside.sum() and w.arrival_s[0] == 0
    assert w.prompt_tokens.tolist() == full.prompt_tokens[inside].tolist()
    a = generate_workload(load_config(trace_cfg(tmp_path, base | {"sample": 0.5})).workload, 0)
    b = generate_workload(load_config(trace_cfg(tmp_path, base | {"sample": 0.5})).workload, 0)
    assert 70 < len(a) < 130 and np.array_equal(a.prompt_tokens, b.prompt_tokens)


def test_replaying_a_past_run(tmp_path):
    p = trace_cfg(tmp_path, {"format": "azure", "file": str(FIX / "azure_conv_200.csv")})
    first = simulate(p)
    out = tmp_path / "req.parquet"
    import pyarrow.parquet as pq
    pq.write_table(first.requests, out)
    again = simulate(trace_cfg(tmp_path, {"format": "fastsim", "file": str(out)}))
    assert np.array_equal(again.requests.column("arrival_s").to_numpy(), first.requests.column("arrival_s").to_numpy())
    assert np.array_equal(again.requests.column("finish_s").to_numpy(), first.requests.column("finish_s").to_numpy())


@pytest.mark.parametrize("fmt,text,needle", [
    ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\nyesterday,1,2\n",
     ":3: TIMESTAMP = 'yesterday'"),
    ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,-5,44\n", ":2: ContextTokens = '-5'"),
    ("azure", "TIMESTAMP,Context\n", ":1: not an Azure trace: no column 'ContextTokens'"),
    ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,3\n", ":2: wrong number of fields"),
    ("mooncake", '{"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": [0]}\n{"timestamp": 1,',
     ":2: not valid JSON"),
    ("mooncake", '{"timestamp": 0, "input_length": 5}\n', ":1: no 'output_length' field"),
    ("mooncake", '{"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": ["a"]}\n',
     ":1: hash_ids must be a list of integers"),
    ("vidur", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,abc,3\n", ":2: num_prefill_tokens = 'abc'"),
])
def test_malformed_lines_name_file_and_line(tmp_path, fmt, text, needle):
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(FastsimError) as e:
        read_trace(fmt, f)
    assert needle in str(e.value) and str(f) in str(e.value)


def test_missing_trace_file(tmp_path):
    with pytest.raises(FastsimError, match="cannot open"):
        read_trace("azure", tmp_path / "none.csv")


@pytest.mark.parametrize("fmt", ["azure", "mooncake", "vidur", "fastsim"])
def test_an_unreadable_trace_says_permission_denied(tmp_path, monkeypatch, fmt):
    """(Tests run as root read any file, so the operating system's refusal is staged.)"""
    import builtins
    import os

    f = tmp_path / ("t.parquet" if fmt == "fastsim" else "t.txt")
    f.write_text("x")
    denied = PermissionError(13, os.strerror(13), str(f))

    def refuse(*args, **kwargs):
        raise denied

    monkeypatch.setattr(Path, "open", refuse)
    monkeypatch.setattr(builtins, "open", refuse)
    import pyarrow.parquet as pq
    monkeypatch.setattr(pq, "read_table", refuse)
    with pytest.raises(FastsimError, match="Permission denied") as e:
        read_trace(fmt, f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_take_keeps_each_rows_block_ids():
    rows = read_trace("mooncake", FIX / "mooncake_conversation_300.jsonl")
    idx = np.array([1, 5, 7])
    sub = rows.take(idx)
    for j, i in enumerate(idx):
        assert sub.hash_ids[sub.hash_offsets[j]:sub.hash_offsets[j + 1]].tolist() == \
            rows.hash_ids[rows.hash_offsets[i]:rows.hash_offsets[i + 1]].tolist()


def test_unbounded_prefix_hits_by_hand(tmp_path):
    from fastsim.workload.sharing import unbounded_prefix_hit_rate, unbounded_prefix_hits

    f = tmp_path / "m.jsonl"
    f.write_text('{"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]}\n'
                 '{"timestamp": 1, "input_length": 1500, "output_length": 5, "hash_ids": [0, 1, 2]}\n'
                 '{"timestamp": 2, "input_length": 700, "output_length": 5, "hash_ids": [0, 3]}\n'
                 '{"timestamp": 3, "input_length": 300, "output_length": 5, "hash_ids": [0]}\n'
                 '{"timestamp": 4, "input_length": 600, "output_length": 5, "hash_ids": [5, 1]}\n')
    rows = read_trace("mooncake", f)
    # 1st: nothing seen. 2nd: [0, 1] seen -> 1024. 3rd: [0] -> 512. 4th: [0] -> 512 capped at 300.
    # 5th: 5 unseen, so the run stops at once even though 1 was seen.
    assert unbounded_prefix_hits(rows).tolist() == [0, 1024, 512, 300, 0]
    assert unbounded_prefix_hit_rate(rows) == pytest.approx(1836 / 4100)


@pytest.mark.skipif(not (Path(__file__).parents[2] / "shared/data/traces/conversation_trace.jsonl").exists(),
                    reason="CI-only check: needs ../shared beside the checkout")
def test_mooncake_reference_hit_rates_from_shared_traces():
    """The issue's reference figures: 37.4% (conversation) and 65.1% (synthetic)."""
    from fastsim.workload.sharing import unbounded_prefix_hit_rate

    traces = Path(__file__).parents[2] / "shared/data/traces"
    assert round(100 * unbounded_prefix_hit_rate(read_trace("mooncake", traces / "conversation_trace.jsonl")), 1) == 37.4
    assert round(100 * unbounded_prefix_hit_rate(read_trace("mooncake", traces / "synthetic_trace.jsonl")), 1) == 65.1


def test_mooncake_replay_with_prefix_caching_approaches_the_unbounded_rate(tmp_path):
    """With a cache that never evicts and requests that do not overlap in time, the simulated hits
    are the unbounded ones less what vLLM's rules cost: whole 16-token blocks, never a prompt's last
    token. With the real cache and real timing they can only be fewer (evictions, parents still
    queued)."""
    from fastsim.workload.sharing import unbounded_prefix_hits

    rows = read_trace("mooncake", FIX / "mooncake_conversation_300.jsonl")
    want = unbounded_prefix_hits(rows)
    base = ["engine.enable_prefix_caching=true", "hardware.gpu=H200-SXM", "model=meta-llama/Llama-3.1-8B",
            "engine.max_model_len=131072"]
    trace = {"format": "mooncake", "file": str(FIX / "mooncake_conversation_300.jsonl")}
    ideal = simulate(load_config(trace_cfg(tmp_path, trace | {"speedup": 0.001}),
                                 base + ["engine.num_gpu_blocks_override=1000000"])).to_pandas()
    got = ideal.cached_tokens.to_numpy()
    assert (got <= want).all() and (got >= want - 16).all()

    real = simulate(load_config(trace_cfg(tmp_path, trace), base))
    s = real.summary
    assert (real.to_pandas().cached_tokens.to_numpy() <= want).all()
    assert 0 < s["prefix_cache_hit_rate"] <= want.sum() / rows.prompt_tokens.sum()
    off = simulate(load_config(trace_cfg(tmp_path, trace), base[1:])).summary
    assert off["prefix_cache_hit_rate"] == 0 and s["mean_ttft_ms"] < off["mean_ttft_ms"]
