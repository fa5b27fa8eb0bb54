"""The run configuration: one YAML file, validated once, with vLLM's engine-argument names."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fastsim.errors import FastsimError
from fastsim.frameworks import FRAMEWORK_NAMES, FRAMEWORKS
from fastsim.policies import DECODE_ROUTERS, PREFILL_ROUTERS, ROUTERS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_yes_no_for_numbers(cls, data: Any) -> Any:
        """pydantic reads `true` as 1 where a number is expected: `num_requests: true` would run one
        request. A yes/no value is refused wherever the field does not take one."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and not _takes_bool(field.annotation):
                    raise ValueError(f"{key}: {str(value).lower()} is a yes/no value where this field takes "
                                     "something else; give a number (or the field's kind of value)")
        return data


def _takes_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_takes_bool(a) for a in getattr(annotation, "__args__", ()) or ()
               if not isinstance(a, (str, int, float)))  # (Literal's values are not types)


# -- length distributions (tokens) ---------------------------------------------------------------
# The longest context any catalog model has is 163,840 tokens; ten million leaves room for any real
# length while keeping arrays sized by token counts finite.
MAX_TOKENS = 10_000_000


class _Bounds(_Strict):
    min: int = Field(default=1, ge=1, le=MAX_TOKENS, description="samples below are raised to this")
    max: int | None = Field(default=None, ge=1, le=MAX_TOKENS, description="samples above are lowered to this")


class Constant(_Bounds):
    dist: Literal["constant"]
    value: int = Field(ge=1, le=MAX_TOKENS)


class Uniform(_Bounds):
    dist: Literal["uniform"]
    low: int = Field(ge=1, le=MAX_TOKENS)
    high: int = Field(ge=1, le=MAX_TOKENS, description="inclusive")

    @model_validator(mode="after")
    def _ordered(self):
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self


class Normal(_Bounds):
    """Normal, truncated to [min, max] (resampled, not clipped)."""
    dist: Literal["normal"]
    mean: float = Field(gt=0, le=MAX_TOKENS)
    std: float = Field(ge=0, le=MAX_TOKENS)


class Lognormal(_Bounds):
    """Lognormal given by the mean and standard deviation of the token counts themselves
    (not of their logarithm)."""
    dist: Literal["lognormal"]
    mean: float = Field(gt=0, le=MAX_TOKENS, description="mean, tokens")
    std: float = Field(gt=0, le=MAX_TOKENS, description="standard deviation, tokens")


class Gamma(_Bounds):
    dist: Literal["gamma"]
    mean: float = Field(gt=0, le=MAX_TOKENS, description="mean, tokens")
    std: float = Field(gt=0, le=MAX_TOKENS, description="standard deviation, tokens")


class Weibull(_Bounds):
    dist: Literal["weibull"]
    shape: float = Field(gt=0)
    scale: float = Field(gt=0, le=MAX_TOKENS, description="tokens")


class Pareto(_Bounds):
    dist: Literal["pareto"]
    shape: float = Field(gt=0, description="tail index alpha")
    scale: float = Field(gt=0, le=MAX_TOKENS, description="minimum value x_m, tokens")


class Empirical(_Bounds):
    """Sampled with replacement from a column of a CSV/Parquet file or a built-in dataset."""
    dist: Literal["empirical"]
    file: str | None = None
    dataset: Literal["sharegpt", "sharegpt_vllm", "bwb", "arxiv"] | None = None
    column: str

    @model_validator(mode="after")
    def _one_source(self):
        if (self.file is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'file' or 'dataset'")
        return self


class Component(_Strict):
    weight: float = Field(gt=0)
    spec: "LengthDist"


class Mixture(_Bounds):
    dist: Literal["mixture"]
    components: list[Component] = Field(min_length=1)


LengthDist = Annotated[Union[Constant, Uniform, Normal, Lognormal, Gamma, Weibull, Pareto, Empirical, Mixture],
                       Field(discriminator="dist")]
Component.model_rebuild()


class Dataset(_Strict):
    """(prompt, output) pairs sampled jointly, with replacement, from a file or a built-in dataset."""
    name: Literal["sharegpt", "sharegpt_vllm", "bwb", "arxiv"] | None = Field(
        default=None, description="built-in length sets: sharegpt (chat), sharegpt_vllm (ShareGPT's first turns "
        "as `vllm bench serve --dataset-name sharegpt` samples them: Llama-3 tokenizer, its length filter), bwb "
        "(long outputs), arxiv (summaries)")
    file: str | None = Field(default=None, description="a CSV or Parquet file of token counts instead")
    prompt_column: str = Field(default="prompt_tokens", description="the file's prompt-length column")
    output_column: str = Field(default="output_tokens", description="the file's output-length column")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.file is None) == (self.name is None):
            raise ValueError("give exactly one of 'name' or 'file'")
        return self


# -- arrivals ----------------------------------------------------------------------------------
class _RandomArrivals(_Strict):
    rate: float = Field(gt=0, description="requests per second")
    schedule: Literal["fastsim", "vllm_bench", "vllm_bench_legacy"] = Field(
        default="fastsim", description="fastsim: gaps drawn from the run's seed; vllm_bench: the very send "
        "times `vllm bench serve --request-rate R --seed S` uses (NumPy's global generator seeded with S, "
        "the gaps rescaled so the last request leaves at num_prompts / R, as vLLM does since July 2025, PR "
        "21108); vllm_bench_legacy: benchmark_serving.py before that (the first request at 0, no rescaling). "
        "Compare a simulation with one benchmark run without the run-to-run spread of random arrivals")
    seed: int | None = Field(default=None, ge=0, description="vllm_bench schedules: vLLM's --seed (default: "
                             "simulation.seed; vllm bench serve's own default is 0)")


class Poisson(_RandomArrivals):
    process: Literal["poisson"]


class GammaArrivals(_RandomArrivals):
    """Gamma inter-arrival times: cv > 1 is burstier than Poisson (cv = 1), cv < 1 smoother."""
    process: Literal["gamma"]
    cv: float | None = Field(default=None, gt=0, description="coefficient of variation of inter-arrival times")
    burstiness: float | None = Field(default=None, gt=0, description="vllm bench serve's --burstiness, the "
                                     "gamma shape: cv = 1 / sqrt(burstiness); give this or cv")

    @model_validator(mode="after")
    def _one_shape(self):
        if (self.cv is None) == (self.burstiness is None):
            raise ValueError("give exactly one of 'cv' or 'burstiness' (vLLM's --burstiness = 1 / cv^2)")
        return self

    @property
    def shape(self) -> float:
        return self.burstiness if self.burstiness is not None else 1.0 / self.cv**2


class ConstantRate(_Strict):
    process: Literal["constant"]
    rate: float = Field(gt=0, description="requests per second")


class Batch(_Strict):
    """Every request at once (offline throughput runs)."""
    process: Literal["batch"]
    at_s: float = Field(default=0.0, ge=0)


class ClosedLoop(_Strict):
    """A fixed number of requests in flight, as `vllm bench serve --max-concurrency N` at its default
    infinite rate: N requests at once, then each as soon as one of those in flight completes."""
    process: Literal["closed_loop"]
    max_concurrency: int = Field(ge=1, le=1 << 20, description="requests in flight at all times (vLLM's "
                                 "--max-concurrency)")


Arrival = Annotated[Union[Poisson, GammaArrivals, ConstantRate, Batch, ClosedLoop], Field(discriminator="process")]


class Trace(_Strict):
    """Requests replayed from a file: Azure LLM inference CSV (TIMESTAMP,ContextTokens,GeneratedTokens),
    Mooncake JSONL (timestamp ms, input_length, output_length, hash_ids), Vidur/etalon CSV
    (arrived_at,num_prefill_tokens,num_decode_tokens; without arrived_at the client's arrival
    process times them) or a request table fastsim wrote."""
    format: Literal["azure", "mooncake", "vidur", "fastsim"] = Field(description="the file's layout")
    file: str = Field(description="path of the trace")
    start_s: float = Field(default=0.0, ge=0, description="window start, seconds of trace time")
    end_s: float | None = Field(default=None, gt=0, description="window end, seconds of trace time")
    speedup: float = Field(default=1.0, gt=0, description="replay this many times faster (2 = twice the rate)")
    rate: float | None = Field(default=None, gt=0, description="rescale arrivals to this mean rate, req/s")
    sample: float = Field(default=1.0, gt=0, le=1, description="fraction of requests kept (seeded)")

    @model_validator(mode="after")
    def _window(self):
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be after start_s ({self.start_s})")
        return self


# -- times (seconds) -------------------------------------------------------------------------------
class ConstantTime(_Strict):
    dist: Literal["constant"]
    value: float = Field(ge=0, description="seconds")


class ExponentialTime(_Strict):
    dist: Literal["exponential"]
    mean: float = Field(gt=0, description="seconds")


class UniformTime(_Strict):
    dist: Literal["uniform"]
    low: float = Field(ge=0, description="seconds")
    high: float = Field(ge=0, description="seconds")

    @model_validator(mode="after")
    def _ordered(self):
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self


class LognormalTime(_Strict):
    """Lognormal given by the mean and standard deviation of the times themselves."""
    dist: Literal["lognormal"]
    mean: float = Field(gt=0, description="seconds")
    std: float = Field(gt=0, description="seconds")


TimeDist = Annotated[Union[ConstantTime, ExponentialTime, UniformTime, LognormalTime], Field(discriminator="dist")]


class Conversation(_Strict):
    """Multi-turn sessions. The client's arrival process starts sessions; turn k+1 arrives when
    turn k's answer is complete plus a think time, with a prompt made of turn k's prompt, its
    answer and new user tokens (the client's prompt_tokens / dataset prompt). A turn that never
    finishes ends its session."""
    turns: LengthDist = Field(description="turns per session (a count distribution)")
    think_time_s: TimeDist = Field(description="from an answer to the next user message, seconds")


class Client(_Strict):
    name: str = Field(default="default", description="the client's name in the output")
    arrival: Arrival | None = Field(default=None, description="arrival process (a trace may bring its own times)")
    num_requests: int | None = Field(default=None, ge=1, description="this client's share; default: "
                                     "workload.num_requests split by rate")
    prompt_tokens: LengthDist | None = Field(default=None, description="prompt length distribution, tokens")
    output_tokens: LengthDist | None = Field(default=None, description="output length distribution, tokens")
    dataset: Dataset | None = Field(default=None, description="(prompt, output) pairs sampled jointly instead")
    trace: Trace | None = Field(default=None, description="replay requests from a file instead")
    system_prompt_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS, description="a prefix shared by every request of "
                                      "this client, added to its prompt lengths")
    conversation: Conversation | None = Field(default=None, description="multi-turn sessions; num_requests "
                                              "counts turns and the arrival process starts sessions")
    online: bool | None = Field(
        default=None, description="requests come through the engine's API server (vllm serve, `vllm bench "
        "serve`), which adds engine.api_server_latency_ms to their TTFT and end-to-end latency; false: "
        "offline (LLM.generate, `vllm bench throughput`). Default: online unless arrival is a batch")

    @model_validator(mode="after")
    def _lengths(self):
        if isinstance(self.arrival, ClosedLoop) and (self.trace is not None or self.conversation is not None):
            raise ValueError("arrival closed_loop sends each request when one in flight completes: drop "
                             "trace / conversation, or give another arrival process")
        if self.trace is not None:
            if self.dataset is not None or self.prompt_tokens is not None or self.output_tokens is not None:
                raise ValueError("a trace brings its own lengths: drop dataset/prompt_tokens/output_tokens")
            if self.conversation is not None or self.system_prompt_tokens:
                raise ValueError("a trace brings its own requests: drop conversation/system_prompt_tokens")
            return self
        if self.arrival is None:
            raise ValueError("give an arrival process, e.g. arrival: {process: poisson, rate: 5.0}")
        if self.dataset is None and (self.prompt_tokens is None or self.output_tokens is None):
            raise ValueError("give prompt_tokens and output_tokens distributions, a dataset, or a trace")
        if self.dataset is not None and (self.prompt_tokens is not None or self.output_tokens is not None):
            raise ValueError("give either a dataset or prompt_tokens/output_tokens, not both")
        return self


class Workload(_Strict):
    num_requests: int | None = Field(default=None, ge=1, description="requests in all (split across clients "
                                     "by rate unless a client gives its own)")
    duration_s: float | None = Field(default=None, gt=0, le=1e9, description="generate arrivals for this long")
    clients: list[Client] = Field(min_length=1, description="request sources, each with its arrivals and "
                                  "lengths")

    @model_validator(mode="after")
    def _size(self):
        if self.num_requests is not None and self.duration_s is not None:
            raise ValueError("give one of num_requests or duration_s, not both")
        sized = all(c.num_requests or c.trace for c in self.clients)
        if self.num_requests is None and self.duration_s is None and not sized:
            raise ValueError("give exactly one of num_requests or duration_s")
        if self.duration_s is not None and any(isinstance(c.arrival, Batch) for c in self.clients) \
                and not all(c.num_requests for c in self.clients if isinstance(c.arrival, Batch)):
            raise ValueError("a batch client in a duration_s workload needs its own num_requests")
        return self


# -- deployment ----------------------------------------------------------------------------------
Dtype = Literal["bf16", "fp16", "fp8", "int8", "int4"]
_QUANTIZED_DTYPE = {"fp8": "fp8", "awq": "int4", "gptq": "int4", "awq_marlin": "int4", "gptq_marlin": "int4",
                    "int8": "int8", "int4": "int4"}


class SpeculativeConfig(_Strict):
    """vLLM's speculative_config. Each step a proposer drafts num_speculative_tokens tokens per
    decoding sequence; the target model verifies them and the draft in one pass and keeps the
    accepted prefix plus one token of its own. How often drafts are accepted depends on the model
    pair and the text, so give it: measured acceptance from vLLM's spec-decode metrics (or papers)."""
    method: Literal["ngram", "draft_model", "eagle", "eagle3", "mtp"] | None = Field(
        default=None, description="ngram: prompt lookup on the CPU (no GPU cost); draft_model: a smaller "
        "model (`model`) runs num_speculative_tokens decode passes; eagle / eagle3 / mtp: a one-layer draft "
        "head of the target's shape with its LM head. Default: draft_model when `model` is given")
    model: str | None = Field(default=None, description="draft model for draft_model: a catalog id or a "
                              "config.json path")
    num_speculative_tokens: int = Field(ge=1, le=64, description="tokens drafted per sequence per step")
    acceptance_rate: float | None = Field(
        default=None, ge=0, le=1, description="probability that a draft token is accepted given that the ones "
        "before it were (the same at every position)")
    acceptance_probs: list[Annotated[float, Field(ge=0, le=1)]] | None = Field(
        default=None, description="per-position conditional acceptance probabilities, one per speculative token")
    draft_tensor_parallel_size: int | None = Field(default=None, ge=1, description="default: the target's")

    @model_validator(mode="after")
    def _complete(self):
        if self.method is None and self.model is None:
            raise ValueError("give method (ngram, draft_model, eagle, eagle3, mtp) or a draft model")
        if (self.method or "draft_model") == "draft_model" and self.model is None:
            raise ValueError("method draft_model needs `model`: the draft model's catalog id or config.json")
        if self.method not in (None, "draft_model") and self.model is not None:
            raise ValueError(f"method {self.method} drafts with the target's own layers; drop `model`")
        if (self.acceptance_rate is None) == (self.acceptance_probs is None):
            raise ValueError("give one of acceptance_rate (e.g. 0.7) or acceptance_probs (one per speculative "
                             "token); acceptance depends on the model pair and the text")
        if self.acceptance_probs is not None and len(self.acceptance_probs) != self.num_speculative_tokens:
            raise ValueError(f"acceptance_probs has {len(self.acceptance_probs)} entries for "
                             f"num_speculative_tokens {self.num_speculative_tokens}; give one per token")
        return self

    @property
    def draft_method(self) -> str:
        return self.method or "draft_model"

    @property
    def probs(self) -> list[float]:
        return self.acceptance_probs or [self.acceptance_rate] * self.num_speculative_tokens

    @property
    def expected_tokens_per_step(self) -> float:
        """1 + sum over positions i of P(drafts 1..i all accepted): the verified token is always kept."""
        out, run = 1.0, 1.0
        for p in self.probs:
            run *= p
            out += run
        return out


class Engine(_Strict):
    """vLLM engine arguments (same names and meanings) plus fastsim's overhead term; with
    framework: sglang, SGLang's scheduler (its arguments under their vLLM names where they mean the
    same: max_num_seqs = --max-running-requests, max_num_batched_tokens = --chunked-prefill-size,
    block_size = --page-size, enable_prefix_caching = not --disable-radix-cache)."""
    name: str = Field(default="vllm", description="this engine's name in the output (engines: variants)")
    framework: Literal[FRAMEWORK_NAMES] = Field(
        default="vllm", description="vllm: V1 scheduling (mixed prefill/decode batches, FCFS); sglang: "
        "prefill batches apart from decode batches, admission that reserves room for running requests' "
        "output, radix cache at token granularity (block_size 1) and longest-prefix-first queueing; trtllm: "
        "TensorRT-LLM in-flight batching (mixed batches within max_num_tokens = max_num_batched_tokens, "
        "max_batch_size = max_num_seqs), capacity_scheduler_policy, KV cache sized by "
        "kv_cache_free_gpu_mem_fraction, FP8 weights and KV where the GPU has FP8; dynamo: NVIDIA Dynamo over vLLM "
        "workers: vLLM's scheduling with prefix caching on, and Dynamo's KV-aware router (cluster.router kv_aware) "
        "unless another router is given; with cluster.disaggregation, its disaggregated serving")
    capacity_scheduler_policy: Literal["guaranteed_no_evict", "max_utilization"] | None = Field(
        default=None, description="TensorRT-LLM's: guaranteed_no_evict (its default) admits a request only "
        "if every running request and it can reach prompt + output tokens without eviction; "
        "max_utilization admits while blocks are free and pauses (preempts) when they run out")
    kv_cache_free_gpu_mem_fraction: float | None = Field(
        default=None, gt=0, le=1, description="TensorRT-LLM's KV cache size: this fraction of the memory "
        "left after weights and activations (default 0.9); replaces gpu_memory_utilization under trtllm")
    schedule_policy: Literal["fcfs", "lpm"] | None = Field(
        default=None, description="SGLang's --schedule-policy; lpm = longest cached prefix first (SGLang "
        "serves a queue of more than 128 first-come-first-served). Default: lpm with prefix caching")
    max_num_seqs: int = Field(default=256, ge=1, le=1 << 20, description="most sequences in one iteration's batch")
    max_num_batched_tokens: int = Field(default=8192, ge=1, le=1 << 24, description="most tokens (prefill chunks + decodes) "
                                        "in one iteration (vLLM and Dynamo: at least max_num_seqs)")
    block_size: Literal[1, 8, 16, 32, 64, 128, 256] = Field(
        default=16, description="tokens per KV block (vLLM's choices; SGLang's --page-size, 1 by default "
        "under framework: sglang)")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="share of GPU memory for weights, "
                                          "activations and KV cache; the KV cache gets what the others leave")
    enable_chunked_prefill: bool = Field(default=True, description="split long prefills across iterations "
                                         "within max_num_batched_tokens (vLLM V1's default)")
    enable_prefix_caching: bool = Field(
        default=False, description="vLLM's automatic prefix caching (vLLM V1 turns it on by default; "
        "fastsim leaves it off unless asked, since runs without shared prefixes are faster without it)")
    long_prefill_token_threshold: int = Field(default=0, ge=0, description="0: no cap")
    tensor_parallel_size: int = Field(default=1, ge=1, le=1024, description="GPUs per replica sharding each layer "
                                      "(heads, MLP, vocabulary), with two all-reduces per layer")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="stages; as many micro-batches in flight")
    data_parallel_size: int = Field(default=1, ge=1, le=1 << 16, description="identical replicas behind the router")
    enable_expert_parallel: bool = Field(
        default=False, description="MoE models: spread whole experts over the tensor_parallel_size x "
        "data_parallel_size GPUs (all-to-all dispatch and combine in every MoE layer; attention data "
        "parallel across the replicas, whose tokens meet in the experts) instead of sharding each expert by TP")
    expert_routing_skew: float = Field(
        default=0.0, ge=0, description="MoE models: Zipf exponent of expert popularity (0: balanced routing; "
        "~0.5-1.2: the hot experts real traffic shows); more distinct experts' weights stay unread at small "
        "batches and, under expert parallelism, the GPU holding the hot experts sets the pace")
    speculative_config: SpeculativeConfig | None = Field(
        default=None, description="speculative decoding (vLLM's speculative_config); none by default")
    max_model_len: int | None = Field(default=None, ge=1, description="default: the model's context")
    dtype: Dtype = Field(default="bf16", description="the weights' storage format: bf16/fp16, or quantized "
                         "fp8 (native FP8 GEMMs where the GPU has them, else weight-only), int8 / int4 (weight-only: "
                         "dequantized into 16-bit GEMMs); activations stay 16-bit")
    quantization: Literal["fp8", "awq", "gptq", "awq_marlin", "gptq_marlin", "int8", "int4"] | None = Field(
        default=None, description="vLLM's quantization method, as a weight format: fp8 -> dtype fp8, "
        "awq / gptq (4-bit) -> int4, int8 -> int8 weight-only")
    kv_cache_dtype: Literal["auto", "bf16", "fp16", "fp8"] = Field(
        default="auto", description="auto: 16-bit, as vLLM (also for quantized weights); fp8 halves the KV "
        "cache's bytes per token, so it holds twice the tokens")
    num_gpu_blocks_override: int | None = Field(default=None, ge=1, le=1 << 30, description="KV blocks per GPU instead of "
                                                  "what memory allows (vLLM's; for experiments)")
    scheduler: Literal["v1", "v0"] = Field(default="v1", description="vLLM's scheduler generation")
    framework_overhead_ms: float | None = Field(
        default=None, ge=0, le=1000,
        description="CPU time of every iteration outside the forward pass (scheduling, input preparation, "
                    "sampling, output processing), in series with the GPU. Default: the framework's, fitted on "
                    "published measurements (fastsim/cost/serving.py; `fastsim validate` shows it)")
    framework_overhead_per_seq_us: float | None = Field(
        default=None, ge=0, le=1e6, description="CPU time of an iteration per scheduled sequence, on top of "
        "framework_overhead_ms. Default: the framework's")
    framework_overhead_per_token_us: float | None = Field(
        default=None, ge=0, le=1e6, description="CPU time of an iteration per scheduled token (prefill and "
        "decode), on top of framework_overhead_ms. Default: the framework's")
    api_server_latency_ms: float | None = Field(
        default=None, ge=0, le=1e5, description="what the API server adds to each online request's TTFT and "
        "end-to-end latency (HTTP, tokenization, detokenization, streaming; clients with online: true). "
        "Default: the framework's (vLLM's OpenAI server, SGLang's, Triton for trtllm)")
    disable_sliding_window: bool | None = Field(
        default=None, description="vLLM's --disable-sliding-window: attend over the whole context of a "
        "sliding-window model (max_model_len is then capped at the window, as vLLM does). Default: the "
        "framework's (vLLM, SGLang: the window is used; TensorRT-LLM: engines attend over the whole cache "
        "unless built with a max attention window)")
    num_scheduler_steps: int = Field(
        default=1, ge=1, le=64, description="vLLM V0's --num-scheduler-steps (0.5.4-0.9; scheduler: v0): a batch "
        "of decodes runs this many steps per scheduling, with no CPU time between them and no request admitted "
        "until they end (a prefill step is one step). vLLM's own runs showed 1.3-2x throughput at 8-10; V1 "
        "dropped it for async scheduling. A request that finishes within the steps leaves at once (vLLM "
        "keeps its slot to the end)")
    async_scheduling: bool = Field(
        default=False, description="vLLM's --async-scheduling (SGLang: its overlap scheduler): the CPU "
        "schedules and prepares an iteration while the GPU runs the one before, so an iteration takes "
        "the longer of its CPU and GPU times instead of their sum. vLLM turns it on by default from 0.14 "
        "and SGLang from 0.4; fastsim's serving terms were fitted on runs without it and no published "
        "point with it is in its development set, so here it is opt-in. vLLM's V1 scheduler, "
        "pipeline_parallel_size 1")


    @model_validator(mode="before")
    @classmethod
    def _framework_defaults(cls, data):
        """SGLang's own defaults where they differ from vLLM's: page size 1, radix cache on, lpm.
        vLLM's `quantization` names the weight format fastsim calls dtype."""
        if isinstance(data, dict) and data.get("quantization") in _QUANTIZED_DTYPE:
            weights = _QUANTIZED_DTYPE[data["quantization"]]
            if data.get("dtype", weights) not in (weights, "bf16", "fp16"):
                raise ValueError(f"quantization {data['quantization']} stores weights as {weights}, but dtype is "
                                 f"{data['dtype']}; drop quantization or dtype")
            data = {**data, "dtype": weights}
        if isinstance(data, dict) and data.get("framework") in FRAMEWORKS:
            fw = FRAMEWORKS[data["framework"]]
            data = {**fw.defaults, **data}
            if "lpm" in fw.queue_policies:  # longest prefix first needs a cache to look in
                data.setdefault("schedule_policy", "lpm" if data.get("enable_prefix_caching") else "fcfs")
        return data

    @model_validator(mode="after")
    def _framework_options(self):
        fw = FRAMEWORKS[self.framework]
        if self.schedule_policy is not None and self.schedule_policy not in fw.queue_policies:
            raise ValueError(f"schedule_policy: {self.schedule_policy} is SGLang's (vLLM serves "
                             "first-come-first-served); set framework: sglang or drop it")
        if fw.budget_at_least_batch and self.max_num_batched_tokens < self.max_num_seqs:
            # vLLM refuses this at startup: a full batch of decodes would not fit in one step's tokens.
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than "
                             f"max_num_seqs ({self.max_num_seqs}); raise max_num_batched_tokens to at least "
                             f"{self.max_num_seqs} or lower max_num_seqs (vLLM refuses this too)")
        if self.scheduler == "v0" and not fw.v0_scheduler:
            raise ValueError(f"scheduler: v0 is vLLM's; framework {self.framework} has its own scheduler "
                             "(drop scheduler)")
        if not fw.trtllm_capacity and (self.capacity_scheduler_policy or self.kv_cache_free_gpu_mem_fraction):
            raise ValueError("capacity_scheduler_policy and kv_cache_free_gpu_mem_fraction are TensorRT-LLM's; "
                             "set framework: trtllm or drop them")
        if self.enable_prefix_caching and not fw.prefix_caching:
            raise ValueError(f"framework {self.framework} is modelled without KV cache reuse; drop "
                             "enable_prefix_caching")
        if self.speculative_config is not None and self.pipeline_parallel_size > 1:
            raise ValueError("speculative_config is modelled with pipeline_parallel_size 1 (as vLLM supports it); "
                             "drop one of them")
        if self.num_scheduler_steps > 1 and (self.scheduler != "v0" or self.pipeline_parallel_size > 1
                                             or self.speculative_config is not None):
            raise ValueError(f"num_scheduler_steps = {self.num_scheduler_steps} is vLLM V0's multi-step scheduling, "
                             "modelled at pipeline_parallel_size 1 without speculative decoding; set scheduler: v0 "
                             "(V1's successor is async_scheduling) or drop it")
        if self.async_scheduling and (self.scheduler == "v0" or self.pipeline_parallel_size > 1
                                      or not fw.async_scheduling):
            raise ValueError("async_scheduling is modelled for vLLM's V1 scheduler (and SGLang's overlap "
                             "scheduler) at pipeline_parallel_size 1; drop async_scheduling, or scheduler: v0 / "
                             "pipeline_parallel_size / framework: trtllm")
        if not fw.long_prefill_threshold and self.long_prefill_token_threshold:
            raise ValueError("long_prefill_token_threshold is vLLM's; SGLang chunks by "
                             "max_num_batched_tokens (--chunked-prefill-size) alone")
        return self


class Hardware(_Strict):
    gpu: str = Field(default="H100-SXM", description="GPU id from `fastsim gpus` (or your gpus_file)")
    profile: str | None = Field(default=None, description="cost profile YAML from `fastsim calibrate`")
    gpus_file: str | None = Field(default=None, description="YAML catalog of your own GPUs")
    prices_usd_per_hour: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="your price of one GPU per hour, by GPU id (overrides the catalog's)")


class Pool(_Strict):
    """`count` identical replicas: a GPU and engine arguments over the run's `engine`."""
    name: str | None = Field(default=None, description="the pool's name in the output")
    count: int = Field(default=1, ge=1, description="replicas in the pool")
    gpu: str | None = Field(default=None, description="default: hardware.gpu")
    engine: dict[str, Any] = Field(default_factory=dict, description="engine arguments to override")


_LINKS = {  # per-GPU bandwidth (GB/s of bytes, one direction) and one-way latency (us) by link kind
    "nvlink": (450.0, 5.0),        # H100 NVLink 4: 900 GB/s both directions
    "infiniband": (50.0, 10.0),    # 400 Gb/s NDR, one NIC per GPU (GPUDirect RDMA)
    "ethernet": (12.5, 50.0),      # 100 GbE
}


class KvTransfer(_Strict):
    """How a request's KV cache moves from its prefill instance to its decode instance: each GPU of
    the prefill instance sends its shard over its own link."""
    link: Literal["nvlink", "infiniband", "ethernet"] = Field(default="infiniband", description="sets the "
                                                               "default bandwidth and latency")
    bandwidth_gb_s: float | None = Field(default=None, gt=0, description="per GPU, GB/s of bytes; default by "
                                         "link: nvlink 450, infiniband 50 (400 Gb/s NDR), ethernet 12.5 (100 GbE)")
    latency_us: float | None = Field(default=None, ge=0, description="per transfer; default by link: nvlink 5, "
                                     "infiniband 10, ethernet 50")
    overlap: bool = Field(default=True, description="layer by layer during the prefill (NIXL, Mooncake): only "
                          "what outlasts the prefill is exposed; false: sent after it")

    def rate_and_latency(self) -> tuple[float, float]:
        bw, lat = _LINKS[self.link]
        return (self.bandwidth_gb_s or bw) * 1e9, (lat if self.latency_us is None else self.latency_us) * 1e-6


class Disaggregation(_Strict):
    """Disaggregated prefill and decode (vLLM's disaggregated prefill, NVIDIA Dynamo, DistServe,
    Splitwise): prefill instances compute each prompt and its first token, then send its KV cache
    to a decode instance, which generates the rest."""
    prefill: "Pool" = Field(description="the prefill pool: count, gpu, engine arguments")
    decode: "Pool" = Field(description="the decode pool: count, gpu, engine arguments")
    kv_transfer: KvTransfer = KvTransfer()
    prefill_router: Literal[PREFILL_ROUTERS] | None = Field(
        default=None, description="default: cluster.router (kv_aware under framework dynamo)")
    decode_router: Literal[DECODE_ROUTERS] | None = Field(
        default=None, description="default: cluster.router (kv_aware under framework dynamo: with no cache in "
        "the decode pool, the fewest blocks in use)")


class Cluster(_Strict):
    router: Literal[ROUTERS] = Field(
        default="round_robin", description="how arrivals pick a replica; least_requests = fewest outstanding; "
        "prefix_aware = the replica caching the longest prefix of the prompt, unless the load is unbalanced "
        "(SGLang router's cache-aware policy, over the replicas' real caches); kv_aware = NVIDIA Dynamo's KV "
        "router: the lowest kv_overlap_score_weight x blocks to prefill + blocks in use. Default round_robin "
        "(kv_aware under framework dynamo)")
    kv_overlap_score_weight: float = Field(default=1.0, ge=0, description="kv_aware: Dynamo's "
                                           "--kv-overlap-score-weight (prefill blocks against blocks in use)")
    cache_threshold: float = Field(default=0.5, ge=0, le=1, description="prefix_aware: the longest cached "
                                   "prefix must cover this share of the prompt, else the least loaded replica")
    balance_abs_threshold: int = Field(default=32, ge=0, description="prefix_aware: route by load alone when "
                                       "the most loaded replica has more than this many requests above the least...")
    balance_rel_threshold: float = Field(default=1.0001, ge=1, description="prefix_aware: ... and more than "
                                         "this many times as many")
    pools: list[Pool] | None = Field(
        default=None, description="replica pools with their own GPU / TP / PP; default: "
        "engine.data_parallel_size replicas of hardware.gpu")
    disaggregation: Disaggregation | None = Field(
        default=None, description="separate prefill and decode pools with KV-cache transfer (instead of pools)")

    @model_validator(mode="after")
    def _one_layout(self):
        if self.disaggregation is not None and self.pools:
            raise ValueError("give cluster.pools or cluster.disaggregation, not both")
        return self


class Simulation(_Strict):
    seed: int = Field(default=0, ge=0, description="seeds every random draw (arrivals, lengths, routing): "
                      "the same config and seed give byte-identical results")
    mode: Literal["exact", "fast", "stepped"] = Field(
        default="fast", description="fast: steady decoding summed in closed form between events (the same "
        "scheduling decisions as exact; times agree to ~1e-12 relative); exact: every iteration stepped, steady "
        "decoding in O(1) each; stepped: every iteration scheduled in full, request by request (the literal "
        "reference, slowest; the same results as exact, bit for bit)")
    max_sim_time_s: float | None = Field(default=None, gt=0,
                                         description="stop here; requests not done are 'unfinished'")
    max_wall_time_s: float | None = Field(
        default=None, gt=0, description="wall-clock budget for the whole run: past it the simulation stops "
        "cleanly, requests not done are 'unfinished', and the summary says stopped_by_wall_time_budget "
        "(results then depend on the machine's speed)")
    warmup_s: float = Field(default=0.0, ge=0, description="exclude requests arriving before this")
    cooldown_s: float = Field(default=0.0, ge=0,
                              description="exclude requests arriving in the last cooldown_s of arrivals")


class Slo(_Strict):
    """Goodput counts requests meeting every SLO given (vLLM's --goodput)."""
    ttft_ms: float | None = Field(default=None, gt=0, description="time to first token")
    tpot_ms: float | None = Field(default=None, gt=0, description="time per output token after the first "
                                  "(per request: its mean)")
    e2el_ms: float | None = Field(default=None, gt=0, description="end-to-end latency")


class Output(_Strict):
    dir: str = Field(default="fastsim-out", description="where results are written")
    format: Literal["parquet", "arrow", "csv"] = Field(default="parquet", description="the per-request table's "
                                                       "format")
    timeline: bool = Field(default=False, description="also write a per-iteration timeline")


class SweepRange(_Strict):
    """Evenly spaced values from start to stop, both included (`key=start:stop:step` on the command line)."""
    start: float
    stop: float
    step: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.stop < self.start:
            raise ValueError(f"stop {self.stop:g} is below start {self.start:g}; give start <= stop")
        if (self.stop - self.start) / self.step > 100_000:
            raise ValueError(f"{(self.stop - self.start) / self.step:.0f} steps; use a larger step")
        return self


class SweepDistribution(_Strict):
    """Random mode only: a value drawn uniformly from [low, high] (log: uniformly in log space)."""
    low: float
    high: float
    log: bool = False
    integer: bool = Field(default=False, description="round the draw to an integer")

    @model_validator(mode="after")
    def _ordered(self):
        if self.high < self.low:
            raise ValueError(f"high {self.high:g} is below low {self.low:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"log needs low > 0, got {self.low:g}")
        return self


class Sweep(_Strict):
    """Configurations to run: each parameter is a dotted config key (`engine.max_num_seqs`,
    `workload.clients.0.arrival.rate`) with its values."""
    mode: Literal["grid", "zip", "random"] = Field(
        default="grid", description="grid: every combination; zip: the i-th value of each together; "
        "random: `samples` points drawn from the values")
    parameters: dict[str, Union[list[Any], SweepRange, SweepDistribution]] = Field(
        min_length=1, description="dotted config key -> values (a list, a range, or in random mode a draw)")
    samples: int | None = Field(default=None, ge=1, description="random mode: how many points")
    seed: int = Field(default=0, ge=0, description="random mode: the draws' seed")

    @model_validator(mode="after")
    def _consistent(self):
        for key, v in self.parameters.items():
            if isinstance(v, list) and not v:
                raise ValueError(f"parameter {key!r} has no values")
            if isinstance(v, SweepDistribution) and self.mode != "random":
                raise ValueError(f"parameter {key!r}: low/high draws need mode: random; give a list or "
                                 f"start/stop/step for {self.mode}")
        if self.mode == "random" and self.samples is None:
            raise ValueError("mode random needs samples: how many points to draw")
        return self


class Config(_Strict):
    simulation: Simulation = Simulation()
    model: str = "meta-llama/Meta-Llama-3-8B"
    hardware: Hardware = Hardware()
    engine: Engine = Engine()
    engines: list[dict[str, Any]] | None = Field(
        default=None, description="variants: each a partial override of `engine` with a name")
    cluster: Cluster = Cluster()
    workload: Workload
    slo: Slo = Slo()
    output: Output = Output()
    sweep: Sweep | None = Field(default=None, description="`fastsim sweep`: the configurations to run")

    def engine_variants(self) -> list[Engine]:
        """The engines to compare on one workload: `engine` alone, or each variant over it."""
        if not self.engines:
            return [self.engine]
        out = []
        for i, override in enumerate(self.engines):
            if not isinstance(override, dict):
                raise FastsimError(f"engines.{i}: must be a mapping of engine arguments, got {override!r}")
            merged = {**self.engine.model_dump(exclude_unset=True), **override}
            merged.setdefault("name", f"engine{i}")
            if "name" not in override:
                merged["name"] = f"engine{i}"
            try:
                out.append(Engine(**merged))
            except ValidationError as e:
                raise FastsimError(format_validation_error(e, prefix=f"engines.{i}")) from None
        names = [e.name for e in out]
        if len(set(names)) != len(names):
            raise FastsimError(f"engines: names must be unique, got {names}")
        return out


DEFAULT_CONFIG: dict = {
    "simulation": {"seed": 0, "mode": "fast"},
    "model": "meta-llama/Meta-Llama-3-8B",
    "hardware": {"gpu": "H100-SXM"},
    "engine": {"max_num_seqs": 256, "max_num_batched_tokens": 8192, "block_size": 16,
               "gpu_memory_utilization": 0.9, "enable_chunked_prefill": True, "tensor_parallel_size": 1},
    # About 70% of what one H100 sustains on these long ShareGPT conversations (~6 requests/s).
    "workload": {"num_requests": 1000, "clients": [
        {"name": "chat", "arrival": {"process": "poisson", "rate": 4.0}, "dataset": {"name": "sharegpt"}}]},
    "slo": {"ttft_ms": 1000, "tpot_ms": 50},
}


_UNION_KEYS = ("process", "dist", "format")
_UNION_TAGS = {"constant", "uniform", "normal", "lognormal", "gamma", "weibull", "pareto", "empirical",
               "mixture", "poisson", "batch", "exponential"}


def format_validation_error(e: ValidationError, prefix: str = "", label: str = "config: ") -> str:
    """One line: `label`, the dotted field path, the value given, and what is allowed."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    # Tagged unions add the tag as a path element ("arrival.poisson.rate"); users wrote "arrival.rate".
    loc = [p for p in loc if p not in _UNION_TAGS and not p.startswith(("function-", "tagged-union"))]
    path = ".".join(([prefix] if prefix else []) + loc) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    if err["type"] == "missing":
        return f"{label}{path} is required but missing{more}"
    if err["type"] == "extra_forbidden":
        return f"{label}{path} is not a known option; check its spelling (`fastsim generate-config` lists all){more}"
    if isinstance(err.get("input"), dict) and err["type"] == "value_error":
        # A rule across a section's keys: the message names them; the whole section adds nothing.
        return f"{label}{path}: {msg}{more}"
    value = repr(err.get("input"))
    value = value if len(value) <= 80 else value[:77] + "..."
    return f"{label}{path} = {value}: {msg}{more}"


def parse_overrides(items: list[str]) -> dict:
    """`--set a.b=value` items (value parsed as YAML) into a nested dict."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise FastsimError(f"--set {item!r}: expected key=value, e.g. engine.max_num_seqs=128")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        set_path(out, key.strip(), value, f"--set {item!r}")
    return out


def set_path(tree: dict, key: str, value, where: str) -> None:
    """tree[a][b][c] = value for key 'a.b.c', creating the levels (a merge into the config follows)."""
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise FastsimError(f"{where}: {p} is already set to a value")
    node[parts[-1]] = value


def deep_merge(base, over):
    """`over` merged into `base`; a dict with integer keys merges into a list by index
    (`--set workload.clients.0.arrival.rate=5`)."""
    if isinstance(base, list) and isinstance(over, dict) and all(str(k).isdigit() for k in over):
        out = list(base)
        for k, v in over.items():
            i = int(k)
            if i >= len(out):
                raise FastsimError(f"--set: index {i} is past the end of a list of {len(out)} items")
            out[i] = deep_merge(out[i], v)
        return out
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    if any(k in over and k in base and over[k] != base[k] for k in _UNION_KEYS):
        return over  # another kind of distribution or process: its fields replace the old ones
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if k in out else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML whose mappings refuse a key given twice (PyYAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_config_file(path: str | Path | dict | None) -> dict:
    """A config file's raw mapping (None: the built-in default scenario; a dict: itself, as a
    notebook user writes one), not yet validated."""
    if path is None:
        return DEFAULT_CONFIG
    if isinstance(path, dict):
        return path
    try:
        raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise FastsimError(f"config: {path} is not a text file (a YAML config is UTF-8 text); "
                           "give the YAML file") from None
    except OSError as e:
        raise FastsimError(f"config: cannot read {str(path)!r} ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise FastsimError(f"config: {path} is not valid YAML{where}: "
                           f"{getattr(e, 'problem', None) or e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FastsimError(f"config: {path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def build_config(raw: dict) -> Config:
    """Validate a raw mapping; a mistake becomes one line naming the field."""
    try:
        return Config(**raw)
    except ValidationError as e:
        raise FastsimError(format_validation_error(e)) from None


def load_config(path: str | Path | dict | None = None, overrides: list[str] | None = None) -> Config:
    """Read and validate a config file (None: the built-in default scenario; a dict: a config's
    mapping), then apply overrides."""
    return build_config(deep_merge(read_config_file(path), parse_overrides(overrides or [])))
