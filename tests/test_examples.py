import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / "examples"
QUICKSTART = EXAMPLES / "quickstart.py"


def test_quickstart_runs_and_reports_the_scaled_momentum(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(QUICKSTART), "--epochs", "1", "--batch-size", "64", "--accumulate", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "full step: global batch 128 = kappa 4 x base 32" in proc.stdout
    assert "rho^kappa = 0.960596" in proc.stdout  # 0.99 ** 4
    assert "samples seen 7373 in 58 optimizer steps" in proc.stdout  # 90% of 8192 samples, 64 x 2 per step


ARGS = "--epochs 3 --schedule 0:32,1:64,2:128 --samples 1280 --out plot.png"


def test_progressive_example_writes_the_plot_and_reports_transitions(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "progressive.py"), *ARGS.split()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    # 90% of 1280 = 1152 training samples per epoch; one row per epoch, kappa from the base batch 32
    first_steps = [line.split()[:4] for line in lines if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert first_steps == [["0", "0", "32", "1"], ["1", "1152", "64", "2"], ["2", "2304", "128", "4"]]
    assert "total: 3456 samples in 63 optimizer steps, progress 1.000" in proc.stdout
    png = tmp_path / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
