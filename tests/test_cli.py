import subprocess
import sys

from typer.testing import CliRunner

from fastsim.cli import app

runner = CliRunner()


def test_models_lists_catalog():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0
    assert "Meta-Llama-3-8B" in res.output and "Qwen2.5-72B" in res.output


def test_gpus_lists_catalog():
    res = runner.invoke(app, ["gpus"], terminal_width=200)
    assert res.exit_code == 0
    assert "H100-SXM" in res.output and "MI300X" in res.output


def test_user_error_is_one_line_and_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastsim.cli", "calibrate", str(tmp_path / "nope.csv"),
                           "--gpu", "H100-SXM"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "cannot open" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "fastsim.cli", "calibrate", "x.csv", "--gpu", "H1OO"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "closest" in proc.stderr and "Traceback" not in proc.stderr
