"""fastsim plot: the figures a run and a sweep allow, opened and measured."""
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from fastsim.cli import app
from fastsim.config import Sweep
from fastsim.errors import FastsimError
from fastsim.plots import DPI, FIGSIZE, plot_results
from fastsim.sweep import run_sweep, sweep_points

BASE = {"model": "meta-llama/Meta-Llama-3-8B", "hardware": {"gpu": "H100-SXM"},
        "workload": {"num_requests": 80, "clients": [{"arrival": {"process": "poisson", "rate": 4.0},
                                                      "dataset": {"name": "sharegpt"}}]}}


def check_image(path):
    img = imread(path)
    assert img.shape[:2] == (int(FIGSIZE[1] * DPI), int(FIGSIZE[0] * DPI))
    assert img[..., :3].std() > 0.05  # something drawn, not a blank canvas
    svg = path.with_suffix(".svg")
    assert ET.parse(svg).getroot().tag.endswith("svg")


def test_run_figures(tmp_path):
    res = CliRunner().invoke(app, ["run", "-q", "--set", "workload.num_requests=80", "--set", "output.timeline=true",
                                   "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    written = plot_results(tmp_path / "run")
    assert sorted(p.name for p in written) == ["latency_cdf.png", "latency_cdf.svg", "timeline.png", "timeline.svg"]
    for p in written:
        if p.suffix == ".png":
            check_image(p)


def test_figures_of_an_earlier_run_do_not_outlive_it(tmp_path):
    """A new run into a folder removes the figures drawn from the old one; `fastsim plot` removes
    figures it has no data for now; a user's own files in plots/ stay."""
    out = tmp_path / "run"
    args = ["run", "-q", "--set", "workload.num_requests=40", "-o", str(out)]
    assert CliRunner().invoke(app, args + ["--set", "output.timeline=true"]).exit_code == 0
    plot_results(out)
    (out / "plots" / "notes.txt").write_text("mine")
    assert CliRunner().invoke(app, args).exit_code == 0  # no timeline this time
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["notes.txt"]
    (out / "plots" / "timeline.png").write_bytes(b"stale")  # as an older fastsim would have left it
    written = plot_results(out)
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["latency_cdf.png", "latency_cdf.svg", "notes.txt"]
    assert {p.name for p in written} == {"latency_cdf.png", "latency_cdf.svg"}


def test_sweep_figures_and_errors(tmp_path):
    points = sweep_points(Sweep(parameters={"workload.clients.0.arrival.rate": [2, 4, 8],
                                            "engine.max_num_seqs": [16, 256]}), BASE)
    run_sweep(BASE, points, tmp_path, jobs=1)
    res = CliRunner().invoke(app, ["plot", str(tmp_path), "-o", str(tmp_path / "figs")], terminal_width=300)
    assert res.exit_code == 0, res.output
    for name in ("sweep_throughput", "sweep_latency"):
        check_image(tmp_path / "figs" / f"{name}.png")
    with pytest.raises(FastsimError, match="not a swept key"):
        plot_results(tmp_path, x="engine.block_size")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastsimError, match="nothing|no requests"):
        plot_results(tmp_path / "empty")
    with pytest.raises(FastsimError, match="not a folder"):
        plot_results(tmp_path / "sweep.parquet")


def test_throughput_curve_is_the_table(tmp_path):
    """The plotted throughput line holds the sweep table's values (read back from the figure's data)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    from fastsim import plots

    points = sweep_points(Sweep(parameters={"workload.clients.0.arrival.rate": [1, 3]}), BASE)
    out = run_sweep(BASE, points, tmp_path, jobs=1)
    table = pq.read_table(out.table_path)
    captured = []
    real_save = plots._save
    plots._save = lambda fig, d, name: captured.append(fig) or real_save(fig, d, name)
    try:
        plots.sweep_curves(table, tmp_path / "f")
    finally:
        plots._save = real_save
    line = captured[0].axes[0].lines[0]
    np.testing.assert_array_equal(line.get_xdata(), [1, 3])
    np.testing.assert_array_equal(line.get_ydata(), table.column("request_throughput").to_numpy())
    plt.close("all")
