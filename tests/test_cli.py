"""The command line: fast help, info, sample, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from freezeasguard.cli import app

runner = CliRunner()


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from freezeasguard.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'info' in r.output and 'sample' in r.output\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"--help imported {proc.stdout.strip()}"


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "freezeasguard", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "freezeasguard" in proc.stdout


def test_info(tiny_latent_dir):
    result = runner.invoke(app, ["info", "--model", str(tiny_latent_dir), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["space"] == "latent" and info["resolution"] == 32
    assert info["components"]["unet"]["tensors"] > 0
    assert info["components"]["unet"]["parameters"] > info["components"]["unet"]["tensors"]
    table = runner.invoke(app, ["info", "-m", str(tiny_latent_dir)])
    assert table.exit_code == 0 and "UNet2DConditionModel" in table.output


def test_info_on_a_bad_directory(tmp_path):
    result = runner.invoke(app, ["info", "--model", str(tmp_path)])
    assert result.exit_code == 2
    assert "model_index.json" in result.output


def test_sample_writes_a_grid(tiny_dir, tmp_path):
    out = tmp_path / "grid.png"
    args = ["sample", "--model", str(tiny_dir), "-p", "a red cat", "-p", "a dog", "--n", "3", "--steps", "3",
            "--png", str(out), "--scale", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    img = Image.open(out)
    # 2 rows x 3 columns of 16 px images with 1 px borders, scaled 2x
    assert img.size == ((3 * 17 + 1) * 2, (2 * 17 + 1) * 2)
    again = tmp_path / "again.png"
    runner.invoke(app, args[:-4] + ["--png", str(again), "--scale", "2"])
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(again)))


def test_tiny_refuses_to_overwrite(tmp_path):
    assert runner.invoke(app, ["tiny", str(tmp_path / "m")]).exit_code == 0
    result = runner.invoke(app, ["tiny", str(tmp_path / "m")])
    assert result.exit_code == 2 and "already exists" in result.output
