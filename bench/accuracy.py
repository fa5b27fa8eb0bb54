"""Cost-model accuracy: forward_time vs measured whole-model forward (layers * layer_ms + lm_head_ms).

Usage: python bench/accuracy.py [STEPS.csv] [--gpu ID] [--profile PROFILE.yaml]
Defaults: the shipped H100 Llama-3-8B measurements and the GPU's built-in profile (for H200, with
fastsim/cost/data/h200_llama3-8b_steps.csv, also the H100 fit transferred by datasheet). Also prints
the error of a profile fitted from the micro-benchmark rows alone, as a user with two minutes of
GPU time would get.
"""
from __future__ import annotations

import argparse
import time
from importlib import resources

from rich.console import Console

from fastsim.catalog import load_gpu
from fastsim.cost import load_profile
from fastsim.cost.profile import default_profile
from fastsim.cost.accuracy import error_table
from fastsim.cost.calibrate import Measurements, fit_profile, read_measurements

SHIPPED = resources.files("fastsim.cost") / "data" / "h100_llama3-8b_steps.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steps", nargs="?", default=str(SHIPPED))
    ap.add_argument("--gpu", default="H100-SXM")
    ap.add_argument("--profile", default=None)
    a = ap.parse_args()
    con = Console()
    gpu = load_gpu(a.gpu)
    meas = read_measurements(a.steps)
    con.print(f"{a.steps}: {len(meas.layers)} layer rows, {len(meas.gemm)} GEMM rows ({meas.gpu})")
    prof = load_profile(a.profile, gpu)
    con.print(f"\nprofile: {a.profile or 'built-in'} ({prof.fitted_on})")
    con.print(error_table(prof, gpu, meas.layers))
    if a.profile is None and prof != default_profile():
        con.print("\nthe H100 fit's fractions of this GPU's datasheet instead (a GPU without measurements)")
        con.print(error_table(default_profile(), gpu, meas.layers))
    t0 = time.perf_counter()
    micro = fit_profile(Measurements(meas.gpu, meas.gemm, meas.copy_gb_s, []), gpu)
    con.print(f"\nprofile fitted from micro-benchmarks only ({time.perf_counter() - t0:.2f} s to fit)")
    con.print(error_table(micro, gpu, meas.layers))


if __name__ == "__main__":
    main()
