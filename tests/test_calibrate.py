import csv
from importlib import resources

import pytest
import yaml
from typer.testing import CliRunner

from fastsim.catalog import load_gpu
from fastsim.cli import app
from fastsim.cost import CostModel, CostProfile, load_profile
from fastsim.cost.accuracy import error_stats
from fastsim.cost.calibrate import Measurements, fit_profile, read_measurements
from fastsim.errors import FastsimError

SHIPPED = str(resources.files("fastsim.cost") / "data" / "h100_llama3-8b_steps.csv")
H100 = load_gpu("H100-SXM")


def test_shipped_rows_meet_accuracy_targets():
    stats = error_stats(load_profile(None), H100, read_measurements(SHIPPED).layers)
    assert set(stats) == {"prefill", "decode", "mixed"}
    for kind, s in stats.items():
        assert s["median_pct"] <= 5.0, (kind, s)
        assert s["p90_pct"] <= 10.0, (kind, s)


def test_micro_only_fit_meets_accuracy_targets():
    meas = read_measurements(SHIPPED)
    prof = fit_profile(Measurements(meas.gpu, meas.gemm, meas.copy_gb_s, []), H100)
    assert "0 layer rows" in prof.fitted_on
    for kind, s in error_stats(prof, H100, meas.layers).items():
        assert s["median_pct"] <= 5.0 and s["p90_pct"] <= 10.0, (kind, s)


def test_fit_recovers_known_parameters_from_synthetic_gemms():
    truth = CostProfile(compute_efficiency=0.6, bandwidth_efficiency=0.8, gemm_latency_us=4.0)
    cm = CostModel.create("meta-llama/Meta-Llama-3-8B", H100, profile=truth)
    shapes = [(m, k, n) for m in (1, 16, 128, 512, 2048, 8192) for k, n in ((4096, 6144), (14336, 4096))]
    meas = Measurements("synthetic", [(m, k, n, cm.gemm_time(m, k, n) * 1e3) for m, k, n in shapes])
    fit = fit_profile(meas, H100)
    assert fit.compute_efficiency == pytest.approx(0.6, rel=1e-3)
    assert fit.bandwidth_efficiency == pytest.approx(0.8, rel=1e-3)
    assert fit.gemm_latency_us == pytest.approx(4.0, rel=1e-2)


def test_cli_calibrate_writes_a_profile_the_cost_model_uses(tmp_path):
    # Only the micro-benchmark rows, as a user measures them on their own GPU.
    src = tmp_path / "micro.csv"
    with open(SHIPPED, newline="") as fh, open(src, "w", newline="") as out:
        r = csv.DictReader(fh)
        w = csv.DictWriter(out, fieldnames=r.fieldnames)
        w.writeheader()
        w.writerows(row for row in r if row["kind"] in ("gemm", "gemm_peak", "copy_bw"))
    prof_path = tmp_path / "prof.yaml"
    res = CliRunner().invoke(app, ["calibrate", str(src), "--gpu", "H100-SXM", "-o", str(prof_path)])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(prof_path.read_text())
    assert 0.6 < data["compute_efficiency"] < 0.85
    cm = CostModel.create("meta-llama/Meta-Llama-3-8B", "H100-SXM", profile=str(prof_path))
    assert cm.profile.compute_efficiency == data["compute_efficiency"]
    # Copy bandwidth sets the elementwise efficiency directly: 2 x 2 GiB / time / datasheet.
    assert data["elementwise_bandwidth_efficiency"] == pytest.approx(2439.3 / 3350, rel=1e-3)


def test_bad_measurement_files(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(FastsimError, match="not a step-times CSV"):
        read_measurements(f)
    f.write_text("kind,batch,stack_ms,seq_len,ctx_len\ngemm,1,abc,4096,4096\n")
    with pytest.raises(FastsimError, match=r"x.csv:2.*stack_ms"):
        read_measurements(f)
    with pytest.raises(FastsimError, match="cannot open"):
        read_measurements(tmp_path / "missing.csv")


def test_bad_profile_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("compute_efficiency: 1.7\n")
    with pytest.raises(FastsimError, match="compute_efficiency"):
        load_profile(f)
    f.write_text("compute_efficency: 0.7\n")
    with pytest.raises(FastsimError, match="compute_efficency"):
        load_profile(f)
