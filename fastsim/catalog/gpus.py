"""GPU datasheet figures: the built-in catalog, and users' own GPUs from YAML."""
from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fastsim.errors import FastsimError, unknown


# Data-center GPUs idle at roughly a tenth to a fifth of their TDP with the model and KV cache
# resident (e.g. ~60-100 W on a 700 W H100 SXM in nvidia-smi); set idle_w where you have a figure.
IDLE_FRACTION_OF_TDP = 0.15
# What CUDA reports as a GPU's total is 98-99% of the datasheet's GiB (H100 SXM 79.19 of 80, RTX 4090
# 23.55 and RTX 3090 23.58 of 24, in the vLLM logs cited in gpus.yaml) where no figure is known.
CUDA_MEMORY_FRACTION = 0.99


class GpuSpec(BaseModel):
    """Datasheet figures of one accelerator. Rates are dense (not 2:4-sparse) peaks."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str
    vendor: Literal["nvidia", "amd"] = Field(default="nvidia", description="whose software stack runs it")
    architecture: Literal["ampere", "ada", "hopper", "blackwell", "cdna3"] | None = Field(
        default=None, description="what kernels written for it reach: attention kernels reach another share of "
        "the peak before Hopper than on it (fastsim.cost.profile.gpu_profile)")
    memory_gib: float = Field(gt=0, description="memory capacity, GiB (datasheet 'GB' of HBM/GDDR)")
    cuda_memory_gib: float | None = Field(
        default=None, gt=0, description="the total CUDA reports (torch.cuda.mem_get_info), GiB: the datasheet's "
        "less what ECC and the driver keep; vLLM's gpu_memory_utilization is a share of it. Default "
        "CUDA_MEMORY_FRACTION x memory_gib")
    mem_bw_gb_s: float = Field(gt=0, description="memory bandwidth, GB/s of bytes")
    memory_type: Literal["HBM2", "HBM2e", "HBM3", "HBM3e", "GDDR6", "GDDR6X", "GDDR7", "LPDDR5X"] | None = Field(
        default=None, description="memory technology: an uncalibrated GPU takes the achieved bandwidth "
        "fractions of a calibrated GPU with the same (fastsim.cost.profile.gpu_profile)")
    bf16_tflops: float = Field(gt=0, description="dense BF16 tensor TFLOP/s")
    fp16_tflops: float | None = Field(default=None, gt=0)
    fp8_tflops: float | None = Field(default=None, gt=0, description="dense FP8; null where absent")
    interconnect: Literal["nvlink", "pcie", "infinity_fabric", "ethernet", "infiniband"] = "pcie"
    link_gb_s: float = Field(gt=0, description="per-direction peer link bandwidth, GB/s of bytes")
    tdp_w: float | None = Field(default=None, gt=0, description="board power at full load, W")
    idle_w: float | None = Field(default=None, gt=0, description="board power with nothing running but the "
                                 "engine loaded, W; default IDLE_FRACTION_OF_TDP x tdp_w")
    boost_clock_mhz: float | None = Field(default=None, gt=0, description="max SM clock; scales fixed kernel costs")
    price_usd_per_hour: float | None = Field(default=None, gt=0, description="rental price of one GPU, US$ per "
                                             "hour (typical on-demand list price; override with your own)")
    source: str = ""

    @property
    def idle_power_w(self) -> float | None:
        if self.idle_w is not None:
            return self.idle_w
        return None if self.tdp_w is None else IDLE_FRACTION_OF_TDP * self.tdp_w

    def power_w(self, utilization: float) -> float | None:
        """Board power at a fraction `utilization` of the time running kernels: linear from idle
        to TDP (nvidia-smi's utilization; memory-bound decoding draws less than TDP, so this is
        an upper bound there)."""
        if self.tdp_w is None:
            return None
        idle = self.idle_power_w
        return idle + (self.tdp_w - idle) * utilization

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30

    @property
    def cuda_memory_bytes(self) -> float:
        return (self.cuda_memory_gib or CUDA_MEMORY_FRACTION * self.memory_gib) * 2**30

    def compute_tflops(self, dtype: str) -> float:
        """Tensor rate the GEMMs run at for weights of `dtype`.

        FP8 runs natively where the GPU has FP8 units. Elsewhere, and for int8/int4, weights are
        dequantized on the fly (weight-only kernels such as Marlin) and multiplied in 16-bit.
        """
        if dtype == "fp8" and self.fp8_tflops:
            return self.fp8_tflops
        if dtype == "fp16" and self.fp16_tflops:
            return self.fp16_tflops
        return self.bf16_tflops


def parse_gpus(data: object, origin: str) -> dict[str, GpuSpec]:
    """A YAML mapping of GPU id -> figures, validated; errors name the GPU and field."""
    if not isinstance(data, Mapping):
        raise FastsimError(f"{origin}: expected a mapping of GPU id -> figures, got {type(data).__name__}")
    out = {}
    for name, fields in data.items():
        if not isinstance(fields, Mapping):
            raise FastsimError(f"{origin}: GPU {name!r} must be a mapping of figures")
        try:
            out[str(name)] = GpuSpec(name=str(name), **fields)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise FastsimError(f"{origin}: GPU {name!r} field {field!r} = {err.get('input')!r}: "
                               f"{err['msg']}") from None
    return out


@cache
def builtin_gpus() -> dict[str, GpuSpec]:
    text = (resources.files("fastsim.catalog") / "data" / "gpus.yaml").read_text()
    return parse_gpus(yaml.safe_load(text), "built-in GPU catalog")


def load_gpu_file(path: str | Path) -> dict[str, GpuSpec]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FastsimError(f"gpu catalog: cannot read {str(path)!r} ({e})") from None
    return parse_gpus(data, str(path))


def gpu_ids() -> list[str]:
    return list(builtin_gpus())


def load_gpu(name: str, custom: Mapping[str, GpuSpec] | None = None) -> GpuSpec:
    """A GPU by id: the user's own entries first, then the built-in catalog."""
    known = {**builtin_gpus(), **(custom or {})}
    if name not in known:
        raise unknown("GPU", name, known, "fastsim gpus")
    return known[name]
