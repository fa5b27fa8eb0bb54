"""Model shapes, read from the fields of a Hugging Face `config.json`, and what follows from them."""
from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fastsim.errors import FastsimError, unknown

# Weight-only formats store int4 as two values per byte; scales and zero points are ignored (< 1%).
BYTES_PER_PARAM = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
EMBEDDING_BYTES = 2.0


def auto_kv_cache_dtype(dtype: str) -> str:
    """vLLM's kv_cache_dtype 'auto': the model's 16-bit type, also under weight quantization."""
    return "fp16" if dtype == "fp16" else "bf16"

_DATA = "fastsim.catalog"
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
             "max_position_embeddings")
# Field names differ between model families for the same quantity: Mixtral says num_local_experts,
# Qwen-MoE num_experts, DeepSeek n_routed_experts.
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


class ModelSpec(BaseModel):
    """A decoder-only transformer, in Hugging Face `config.json` terms."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str
    hidden_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(ge=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = Field(gt=0)
    attention_bias: bool = False
    sliding_window: int | None = Field(default=None, gt=0)
    num_local_experts: int = Field(default=0, ge=0)
    num_experts_per_tok: int = Field(default=0, ge=0)
    moe_intermediate_size: int = Field(default=0, ge=0)
    shared_expert_intermediate_size: int = Field(default=0, ge=0)
    first_k_dense_replace: int = Field(default=0, ge=0, description="leading layers with a dense MLP (DeepSeek)")
    # Multi-head latent attention (DeepSeek-V2/V3): the cache holds one compressed latent of
    # kv_lora_rank plus a shared rotary key per token and layer, whatever the head count.
    kv_lora_rank: int = Field(default=0, ge=0)
    q_lora_rank: int = Field(default=0, ge=0, description="0: queries projected directly from the hidden state")
    qk_nope_head_dim: int = Field(default=0, ge=0)
    qk_rope_head_dim: int = Field(default=0, ge=0)
    v_head_dim: int = Field(default=0, ge=0)

    # -- shapes -------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace if self.is_moe else 0

    @property
    def q_size(self) -> int:
        """Width of all query heads (MLA: each head's non-rotary and rotary parts)."""
        if self.is_mla:
            return self.num_attention_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        return self.num_attention_heads * self.head_dim

    @property
    def attn_out_size(self) -> int:
        """Width of all heads' attention output, the output projection's input."""
        return self.num_attention_heads * (self.v_head_dim if self.is_mla else self.head_dim)

    @property
    def kv_size(self) -> int:
        """Width of K (and of V) for one token in one layer: GQA/MQA models have fewer KV heads."""
        return self.num_key_value_heads * self.head_dim

    def kv_cache_width(self, tp: int = 1) -> float:
        """Values cached per token and layer on one of `tp` GPUs. KV heads are split across TP ranks
        down to one each and replicated beyond; an MLA latent is replicated on every rank."""
        if self.is_mla:
            return float(self.kv_lora_rank + self.qk_rope_head_dim)
        return 2.0 * max(self.num_key_value_heads / tp, 1.0) * self.head_dim

    def attention_flops_per_pair(self, prefill: bool) -> float:
        """QK^T + PV FLOPs of one (query, key) pair in one layer, all heads. MLA decodes with the
        up-projections absorbed (scores and values over the latent: vLLM's decode path) and
        prefills over decompressed heads."""
        heads = self.num_attention_heads
        if not self.is_mla:
            return 4.0 * self.q_size
        if prefill:
            return 2.0 * heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)
        return 2.0 * heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim)

    # -- parameters ----------------------------------------------------------------------------
    @property
    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        if self.is_mla:
            return sum(k * n for k, n, _ in self.mla_projections())
        bias = (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h + bias

    def mla_projections(self) -> list[tuple[int, int, str]]:
        """(in, out, what TP splits) of MLA's projections: queries (through a low-rank step when
        q_lora_rank is set), the latent with the shared rotary key, its up-projection to per-head K
        and V, and the output projection. Per-head widths are split across TP ranks ("out" or "in");
        the low-rank steps are replicated ("")."""
        h, heads = self.hidden_size, self.num_attention_heads
        q_head = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = ([(h, self.q_lora_rank, ""), (self.q_lora_rank, heads * q_head, "out")] if self.q_lora_rank
             else [(h, heads * q_head, "out")])
        return q + [(h, self.kv_lora_rank + self.qk_rope_head_dim, ""),
                    (self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim), "out"),
                    (heads * self.v_head_dim, h, "in")]

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def mlp_params_per_layer(self) -> float:
        """All MLP weights of a layer, averaged over the layers (every expert of an MoE layer, its
        router and shared expert; DeepSeek's leading dense layers)."""
        h = self.hidden_size
        if not self.is_moe:
            return self.dense_mlp_params
        experts = self.num_local_experts * 3 * h * self.moe_intermediate_size
        moe = experts + h * self.num_local_experts + 3 * h * self.shared_expert_intermediate_size
        return (self.moe_layers * moe + self.first_k_dense_replace * self.dense_mlp_params) / self.num_hidden_layers

    @property
    def active_mlp_params_per_layer(self) -> float:
        """MLP weights one token multiplies by, averaged over the layers: top-k experts, router and
        shared expert."""
        if not self.is_moe:
            return self.mlp_params_per_layer
        h = self.hidden_size
        moe = (self.num_experts_per_tok * 3 * h * self.moe_intermediate_size
               + h * self.num_local_experts + 3 * h * self.shared_expert_intermediate_size)
        return (self.moe_layers * moe + self.first_k_dense_replace * self.dense_mlp_params) / self.num_hidden_layers

    def check_expert_split(self, ep: int) -> None:
        """Expert parallelism over `ep` GPUs needs the routed experts to split evenly."""
        if self.is_moe and self.num_local_experts % ep:
            raise FastsimError(f"engine.enable_expert_parallel: {self.name}'s {self.num_local_experts} experts do "
                               f"not split evenly over tensor_parallel_size x data_parallel_size = {ep} GPUs; use "
                               "sizes whose product divides the expert count")

    @property
    def expert_params(self) -> int:
        """Routed experts' weights over all layers: what expert parallelism divides."""
        return self.moe_layers * self.num_local_experts * 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Tied embeddings share the input table; the output projection still reads it every step."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        h = self.hidden_size
        per_layer = self.attention_params_per_layer + self.mlp_params_per_layer + 2 * h
        return round(self.num_hidden_layers * per_layer + self.embedding_params + self.lm_head_params + h)

    @property
    def num_active_params(self) -> int:
        h = self.hidden_size
        per_layer = self.attention_params_per_layer + self.active_mlp_params_per_layer + 2 * h
        return round(self.num_hidden_layers * per_layer + self.embedding_params + self.lm_head_params + h)

    def weight_bytes(self, dtype: str = "bf16") -> float:
        """Quantized checkpoints (FP8, GPTQ/AWQ int4, int8) keep the embedding and LM head in 16 bits."""
        ends = self.embedding_params + self.lm_head_params
        return (self.num_params - ends) * _bytes_per_param(dtype, "dtype") + ends * EMBEDDING_BYTES

    def kv_bytes_per_token(self, kv_cache_dtype: str = "bf16") -> float:
        """K and V of one token across all layers."""
        return self.kv_cache_width() * self.num_hidden_layers * _bytes_per_param(kv_cache_dtype, "kv_cache_dtype")

    def flops_per_token(self, context_tokens: int = 0) -> float:
        """Forward FLOPs for one new token attending over `context_tokens` earlier ones.

        2 per multiply-accumulate of every weight the token touches (embedding lookup excluded,
        the LM head included), plus QK^T and PV over the context and itself.
        """
        matmul_params = self.num_active_params - self.embedding_params + (
            self.embedding_params if self.tie_word_embeddings else 0)
        matmul_params -= self.hidden_size * (2 * self.num_hidden_layers + 1)  # norms are not matmuls
        attention = self.attention_flops_per_pair(False) * (context_tokens + 1) * self.num_hidden_layers
        return 2.0 * matmul_params + attention


def _bytes_per_param(dtype: str, field: str) -> float:
    try:
        return BYTES_PER_PARAM[dtype]
    except KeyError:
        raise FastsimError(f"{field}: {dtype!r} is not a known dtype; use one of "
                           f"{', '.join(BYTES_PER_PARAM)}") from None


def _builtin_files() -> dict[str, str]:
    folder = resources.files(_DATA) / "data" / "models"
    return {f.name[:-5].replace("--", "/"): f.name for f in folder.iterdir() if f.name.endswith(".json")}


def model_ids() -> list[str]:
    return sorted(_builtin_files())


def from_config_dict(cfg: dict, name: str) -> ModelSpec:
    """Build a ModelSpec from the fields of a Hugging Face config.json."""
    if not isinstance(cfg, dict):
        raise FastsimError(f"{name}: config.json must hold a JSON object, got {type(cfg).__name__}")
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers nest the LM
        cfg = cfg["text_config"]
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise FastsimError(f"{name}: config.json has no {missing[0]!r} field, which fastsim needs "
                           f"to size the model; add it (required: {', '.join(_REQUIRED)})")
    n_experts = next((cfg[k] for k in _EXPERT_COUNT_KEYS if cfg.get(k)), 0)
    if not n_experts and "intermediate_size" not in cfg:
        raise FastsimError(f"{name}: config.json has no 'intermediate_size' field; add it")
    heads = cfg["num_attention_heads"]
    fields = dict(
        name=name,
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        # Hugging Face's own default: no num_key_value_heads means multi-head attention.
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate_size=cfg.get("intermediate_size", 0),
        vocab_size=cfg["vocab_size"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg["max_position_embeddings"],
        attention_bias=bool(cfg.get("attention_bias", False)),
        # Qwen2 configs carry a sliding_window they do not use unless use_sliding_window is set.
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
    )
    if n_experts:
        fields.update(
            num_local_experts=n_experts,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0),
            moe_intermediate_size=cfg.get("moe_intermediate_size") or cfg.get("intermediate_size", 0),
            shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size")
            or cfg.get("n_shared_experts", 0) * (cfg.get("moe_intermediate_size") or 0),
        )
        # DeepSeek: the first first_k_dense_replace layers are dense (intermediate_size), the rest MoE.
        fields["first_k_dense_replace"] = cfg.get("first_k_dense_replace") or 0
        if not fields["num_experts_per_tok"]:
            raise FastsimError(f"{name}: config.json names {n_experts} experts but no "
                               "'num_experts_per_tok'; add it")
    if cfg.get("kv_lora_rank"):
        fields.update({k: cfg.get(k) or 0 for k in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
                                                     "qk_rope_head_dim", "v_head_dim")})
        fields["head_dim"] = fields["qk_nope_head_dim"] + fields["qk_rope_head_dim"]
    try:
        return ModelSpec(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise FastsimError(f"{name}: config.json field {field!r} = {err.get('input')!r}: "
                           f"{err['msg']}") from None


@cache
def load_model(name_or_path: str) -> ModelSpec:
    """A catalog id (e.g. 'meta-llama/Meta-Llama-3-8B') or a path to a config.json (or its folder)."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FastsimError(f"model: cannot read {str(path)!r} as JSON ({e})") from None
        return from_config_dict(cfg, str(name_or_path))
    files = _builtin_files()
    if name_or_path not in files:
        if name_or_path.endswith(".json") or name_or_path.startswith((".", "/", "~")):
            raise FastsimError(f"model: no config.json at {name_or_path!r}; give a catalog id "
                               "(`fastsim models`) or the path of a Hugging Face config.json or its folder")
        raise unknown("model", name_or_path, files, "fastsim models")
    text = (resources.files(_DATA) / "data" / "models" / files[name_or_path]).read_text()
    return from_config_dict(json.loads(text), name_or_path)
