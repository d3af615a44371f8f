import subprocess
import sys
from pathlib import Path

QUICKSTART = Path(__file__).parents[1] / "examples" / "quickstart.py"


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
