import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"


def run_example(script: str, args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``examples/<script> <args>`` in ``cwd`` as a user would; a failure shows the end of its stderr."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args.split()], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quickstart_runs_and_reports_the_scaled_momentum(tmp_path):
    proc = run_example("quickstart.py", "--epochs 1 --batch-size 64 --accumulate 2", tmp_path)
    assert "full step: global batch 128 = kappa 4 x base 32" in proc.stdout
    assert "rho^kappa = 0.960596" in proc.stdout  # 0.99 ** 4
    assert "samples seen 7373 in 58 optimizer steps" in proc.stdout  # 90% of 8192 samples, 64 x 2 per step


def test_progressive_example_writes_the_plot_and_reports_transitions(tmp_path):
    args = "--epochs 3 --schedule 0:32,1:64,2:128 --samples 1280 --out plot.png"
    proc = run_example("progressive.py", args, tmp_path)
    lines = proc.stdout.splitlines()
    # 90% of 1280 = 1152 training samples per epoch; one row per epoch, kappa from the base batch 32
    first_steps = [line.split()[:4] for line in lines if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert first_steps == [["0", "0", "32", "1"], ["1", "1152", "64", "2"], ["2", "2304", "128", "4"]]
    assert "total: 3456 samples in 63 optimizer steps, progress 1.000" in proc.stdout
    png = tmp_path / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


@pytest.mark.parametrize(("script", "teacher"), [("byol.py", "momentum backbone"), ("dino.py", "teacher backbone")])
def test_self_supervised_examples_run_on_generated_images(tmp_path, script, teacher):
    proc = run_example(script, "--epochs 2 --schedule 0:8,1:16 --train-samples 64 --out plot.png", tmp_path)
    assert "total: 128 samples in 12 optimizer steps, progress 1.000" in proc.stdout  # 8 steps of 8, 4 of 16
    accuracy = re.search(rf"{teacher} (\d\.\d+)", proc.stdout)
    assert accuracy and 0.0 <= float(accuracy.group(1)) <= 1.0, proc.stdout[-2000:]
    assert "= 16 samples per optimizer step (was 8 x 1), kappa 2 for 'ema'" in proc.stderr
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("config", sorted((EXAMPLES / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_parses_and_runs_one_step(tmp_path, config):
    proc = run_example("cli.py", f"fit --config={config} --trainer.fast_dev_run=1", tmp_path)
    assert "`max_steps=1` reached" in proc.stderr
    assert "samples per optimizer step, kappa 1 for 'ema'" in proc.stderr
