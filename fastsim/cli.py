"""The `fastsim` command line: a thin layer over validated config and the library."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fastsim.errors import FastsimError
from fastsim.output import write_text_atomic

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fastsim: predict what an LLM-serving deployment does under a workload.")
console = Console()
err_console = Console(stderr=True)


def _table(key: str, *columns: str) -> Table:
    """A listing whose first column (an id users copy) never wraps."""
    t = Table()
    t.add_column(key, no_wrap=True)
    for c in columns:
        t.add_column(c)
    return t


@app.command("models")
def models_cmd() -> None:
    """List the built-in models (any local config.json path works too)."""
    from fastsim.catalog import load_model, model_ids

    t = _table("id", "params (B)", "layers", "hidden", "heads / kv", "KV KiB/token (bf16)", "max context")
    for mid in model_ids():
        m = load_model(mid)
        t.add_row(mid, f"{m.num_params / 1e9:.2f}", str(m.num_hidden_layers), str(m.hidden_size),
                  f"{m.num_attention_heads} / {m.num_key_value_heads}",
                  f"{m.kv_bytes_per_token('bf16') / 1024:.0f}", str(m.max_position_embeddings))
    console.print(t)


@app.command("gpus")
def gpus_cmd() -> None:
    """List the built-in GPUs with their datasheet figures."""
    from fastsim.catalog.gpus import builtin_gpus

    t = _table("id", "memory GiB", "bandwidth GB/s", "bf16 TFLOP/s", "fp8 TFLOP/s", "link", "TDP W")
    for g in builtin_gpus().values():
        t.add_row(g.name, f"{g.memory_gib:g}", f"{g.mem_bw_gb_s:g}", f"{g.bf16_tflops:g}",
                  f"{g.fp8_tflops:g}" if g.fp8_tflops else "-", f"{g.interconnect} {g.link_gb_s:g} GB/s",
                  f"{g.tdp_w:g}" if g.tdp_w else "-")
    console.print(t)


@app.command("calibrate")
def calibrate_cmd(
    measurements: Annotated[Path, typer.Argument(help="step-times CSV in the format of measure_steps.py")],
    gpu: Annotated[str, typer.Option("--gpu", help="GPU catalog id the measurements were taken on")],
    out: Annotated[Path, typer.Option("-o", "--out", help="where to write the fitted profile (YAML)")] = Path("profile.yaml"),
) -> None:
    """Fit a cost profile from measured GEMM/copy micro-benchmarks (and layer rows, if any)."""
    from fastsim.catalog import load_gpu
    from fastsim.cost.accuracy import error_table
    from fastsim.cost.calibrate import fit_profile, read_measurements

    spec = load_gpu(gpu)
    meas = read_measurements(measurements)
    prof = fit_profile(meas, spec)
    write_text_atomic(out, prof.to_yaml())
    console.print(f"fitted on {len(meas.gemm)} GEMM rows and {len(meas.layers)} layer rows -> {out}")
    if meas.layers:
        console.print(error_table(prof, spec, meas.layers))


def main() -> None:
    try:
        app(standalone_mode=False)
    except FastsimError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click's usage errors carry their own exit code and message
        import click
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
