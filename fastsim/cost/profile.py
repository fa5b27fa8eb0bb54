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
    fp8_compute_efficiency: float | None = Field(
        default=None, gt=0, le=1, description="the same for native FP8 GEMMs, which reach less of their "
        "(doubled) peak; default: compute_efficiency")
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
    # The link terms are fitted on the development set's TP 2-8 points over NVLink, and FP8 GEMMs'
    # share of their peak on its FP8 points (bench/fit_serving.py): a single-GPU BF16 calibration
    # cannot see them.
    link_efficiency: float = Field(default=0.513, gt=0, le=1, description="all-reduce bus bandwidth / link bandwidth")
    allreduce_latency_us: float = Field(default=20.5, ge=0, description="fixed cost of one all-reduce: launch "
                                        "and synchronisation (a framework's own: fastsim.cost.serving)")
    link_latency_us: float = Field(default=0.58, ge=0, description="latency of one ring step or point-to-point send")
    fp8_attention: bool = Field(default=False, description="prefill attention runs in FP8 (at the FP8 peak) when "
                                "the KV cache is FP8 and the GPU has FP8 (TensorRT-LLM's FP8 context FMHA)")

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


# Profiles fitted by `fastsim calibrate` on measured step times of the GPU itself
# (fastsim/cost/data/<gpu>_llama3-8b_steps.csv, with the program that measured them).
CALIBRATED = {"H100-SXM": "default_profile.yaml", "H200-SXM": "h200_profile.yaml"}
# The fits' fields that are achieved fractions of the datasheet bandwidth. They belong to the memory
# technology more than to the GPU: H200's HBM3e streams GEMM weights at 89% of its datasheet figure
# as H100's HBM3 does at 92%, but its elementwise kernels and decode attention reach only ~2.7 TB/s
# of 4.8 (56%), about what H100 reaches of 3.35 (73-74%). A GPU without a fit of its own takes
# these from a calibrated GPU with its memory technology, the rest from the H100 fit.
BANDWIDTH_FIELDS = ("bandwidth_efficiency", "elementwise_bandwidth_efficiency", "attention_bandwidth_efficiency")
BANDWIDTH_BY_MEMORY = {"HBM3e": "H200-SXM"}
# FlashAttention-2, which the calibration program's SDPA runs, reaches 50-73% of an A100's 16-bit peak
# in its forward pass (Dao 2023, FlashAttention-2, Fig. 4-5: up to 225 TFLOP/s of 312) but 30-37% of
# an H100's (Shah et al. 2024, FlashAttention-3, Fig. 5: FA2 at ~330-370 of 989): it is written for
# Ampere. A GPU before Hopper takes the H100 fit's attention fraction times this ratio of the two.
PRE_HOPPER_ATTENTION = 1.8
PRE_HOPPER = ("ampere", "ada")
# The link bandwidth term was fitted over NVLink; a GPU on another link keeps the earlier prior
# (no point of the development set measures one).
OTHER_LINK = {"link_efficiency": 0.8}


@cache
def _builtin(name: str) -> CostProfile:
    text = (resources.files("fastsim.cost") / "data" / name).read_text()
    return _parse(yaml.safe_load(text), f"built-in cost profile {name}")


def default_profile() -> CostProfile:
    """Fitted by `fastsim calibrate` on the shipped H100 measurements (fastsim/cost/data)."""
    return _builtin(CALIBRATED["H100-SXM"])


def gpu_profile(gpu) -> CostProfile:
    """The built-in profile of a catalog GPU (fastsim.catalog.GpuSpec): its own fit where fastsim has
    measured step times of it, else the datasheet transfer (see BANDWIDTH_BY_MEMORY)."""
    if gpu.name in CALIBRATED:
        return _builtin(CALIBRATED[gpu.name])
    base = default_profile()
    if gpu.interconnect != "nvlink":
        base = base.model_copy(update=OTHER_LINK)
    if gpu.architecture in PRE_HOPPER:
        base = base.model_copy(update={"attention_efficiency": min(base.attention_efficiency * PRE_HOPPER_ATTENTION, 1.0)})
    donor = BANDWIDTH_BY_MEMORY.get(gpu.memory_type)
    if donor is None:
        return base
    fit = _builtin(CALIBRATED[donor])
    return base.model_copy(update={f: getattr(fit, f) for f in BANDWIDTH_FIELDS})


def profile_origin(gpu) -> str:
    """How fastsim gets a GPU's achieved rates, in a few words (`fastsim gpus`)."""
    if gpu.name in CALIBRATED:
        return "measured"
    if profile_warning(gpu):
        return "uncalibrated"
    donor = BANDWIDTH_BY_MEMORY.get(gpu.memory_type)
    return f"{donor.split('-')[0]} bw" if donor else "H100 fit"


def profile_warning(gpu) -> str | None:
    """Why a GPU's predictions are not to be trusted as they stand, if they are not."""
    if gpu.vendor != "nvidia" and gpu.name not in CALIBRATED:
        return (f"{gpu.name} has no measured step times: its rates are the H100 fit's fractions of its datasheet, "
                "but its software stack (ROCm kernels, RCCL) reaches other fractions; published serving results "
                "on MI300X run 1.4-1.9x slower than such predictions. Calibrate it (fastsim calibrate, "
                "hardware.profile) before relying on its figures")
    return None


def load_profile(profile: str | Path | CostProfile | None, gpu=None) -> CostProfile:
    """A profile given as a path or object; None: the built-in one of `gpu` (a GpuSpec), or H100's."""
    if profile is None:
        return default_profile() if gpu is None else gpu_profile(gpu)
    if isinstance(profile, CostProfile):
        return profile
    try:
        data = yaml.safe_load(Path(profile).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FastsimError(f"profile: cannot read {str(profile)!r} ({e}); "
                           "make one with `fastsim calibrate`") from None
    return _parse(data, str(profile))
