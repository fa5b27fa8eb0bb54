"""Efficiency profile: the few fitted numbers that turn datasheet peaks into achieved times."""
from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fastsim.errors import FastsimError


class ElementwisePasses(BaseModel):
    """Elementwise traffic of one token in one layer, in passes over each activation width.

    A pass is one read or one write of the activation in 16 bits. The defaults count an unfused
    eager layer as the calibration program runs it: RMSNorm (read, write) x 2, residual adds
    (read 2, write 1) x 2 -> 10 hidden-size passes; RoPE as slices, products and a concat -> ~9 over
    Q and K, plus the attention output re-layout over Q; SiLU (2) and the gate product (3) -> 5
    intermediate-size passes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    hidden: float = Field(default=10.0, ge=0)
    q: float = Field(default=11.0, ge=0)
    kv: float = Field(default=9.0, ge=0)
    intermediate: float = Field(default=5.0, ge=0)


class CostProfile(BaseModel):
    """Achieved fractions of datasheet peaks and fixed per-kernel costs for one GPU (+ software stack).

    Fractions apply to the GPU catalog's datasheet figures, so a profile fitted on one GPU is a
    reasonable prior for another of the same generation; `fastsim calibrate` fits one per GPU.
    The field defaults are round priors near the H100 fit; they seed every fit and stand for what
    a fit from micro-benchmarks alone cannot see (attention, small kernels).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    fitted_on: str = Field(default="", description="what the numbers were fitted to (informational)")
    compute_efficiency: float = Field(default=0.73, gt=0, le=1, description="large-GEMM FLOP/s / dense peak")
    bandwidth_efficiency: float = Field(default=0.92, gt=0, le=1, description="GEMM operand streaming / peak bandwidth")
    elementwise_bandwidth_efficiency: float = Field(default=0.73, gt=0, le=1, description="elementwise read+write / peak bandwidth")
    attention_efficiency: float = Field(default=0.30, gt=0, le=1, description="attention matmul FLOP/s / 16-bit dense peak")
    attention_bandwidth_efficiency: float = Field(default=0.74, gt=0, le=1, description="KV-cache reads / peak bandwidth")
    attention_half_fill_tiles: float = Field(default=350.0, ge=0, description="prefill attention work tiles (head x 128 queries) at which it runs at half its rate: ~2 per SM")
    overlap: float = Field(default=4.0, ge=1, le=64, description="p of the soft roofline; 1 = sum, large = max. "
                           "Not fitted: 4 fits measured GEMMs near the ridge as well as a fitted p (4.35) and is fast")
    gemm_latency_us: float = Field(default=5.0, ge=0, description="fixed cost of one GEMM")
    kernel_latency_us: float = Field(default=2.0, ge=0, description="fixed cost of one small kernel")
    attention_latency_us: float = Field(default=7.5, ge=0, description="fixed cost of one attention kernel")
    reference_clock_mhz: float | None = Field(
        default=None, gt=0, description="boost clock of the GPU the latencies were fitted on; on a GPU "
        "with another clock they scale by reference / its clock (launch, fill and drain are clocked)")
    elementwise_kernels_per_layer: float = Field(default=24.0, ge=0, description="small kernels per decoder layer")
    elementwise_passes: ElementwisePasses = ElementwisePasses()
    link_efficiency: float = Field(default=0.8, gt=0, le=1, description="all-reduce bus bandwidth / link bandwidth")
    allreduce_latency_us: float = Field(default=8.0, ge=0, description="fixed cost of one all-reduce: launch "
                                        "and synchronisation (vLLM's one-shot custom all-reduce on NVLink)")
    link_latency_us: float = Field(default=0.5, ge=0, description="latency of one ring step or point-to-point send")

    def to_yaml(self) -> str:
        head = ("# fastsim cost profile: achieved fractions of datasheet peaks and fixed per-kernel costs.\n"
                "# Use with `hardware: {profile: this.yaml}` or CostModel.create(..., profile=path).\n")
        # Fitted numbers carry 4 significant digits: more is noise, and the file stays readable.
        def rounded(v):
            if isinstance(v, dict):
                return {k: rounded(x) for k, x in v.items()}
            return float(f"{v:.4g}") if isinstance(v, float) else v
        return head + yaml.safe_dump(rounded(self.model_dump()), sort_keys=False)


def _parse(data: object, origin: str) -> CostProfile:
    if not isinstance(data, dict):
        raise FastsimError(f"{origin}: a cost profile must be a YAML mapping of parameter: value")
    try:
        return CostProfile(**data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise FastsimError(f"{origin}: {field} = {err.get('input')!r}: {err['msg']}") from None


@cache
def default_profile() -> CostProfile:
    """Fitted by `fastsim calibrate` on the shipped H100 measurements (fastsim/cost/data)."""
    text = (resources.files("fastsim.cost") / "data" / "default_profile.yaml").read_text()
    return _parse(yaml.safe_load(text), "built-in cost profile")


def load_profile(profile: str | Path | CostProfile | None) -> CostProfile:
    if profile is None:
        return default_profile()
    if isinstance(profile, CostProfile):
        return profile
    try:
        data = yaml.safe_load(Path(profile).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FastsimError(f"profile: cannot read {str(profile)!r} ({e}); "
                           "make one with `fastsim calibrate`") from None
    return _parse(data, str(profile))
