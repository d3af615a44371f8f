"""2-process CPU DDP, run in a subprocess with a timeout so that a hang can never stall the suite."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def test_ddp_two_processes_kappa_counts_world_size(tmp_path):
    out = tmp_path / "result.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / "ddp_run.py"), str(out)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as err:  # pragma: no cover - a hang is a failure, never a stall
        pytest.fail(f"the DDP run did not finish in 300 s: {err.stdout!r} {err.stderr!r}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    metrics = result["metrics"]
    # 24 samples per epoch split over 2 ranks, micro-batch 3, accumulation 2: 2 steps per epoch of 12 samples
    assert metrics["ema/kappa"] == 2.0
    assert metrics["ema/batch_size"] == 12
    assert metrics["ema/samples_seen"] == 48
    assert metrics["ema/momentum"] == pytest.approx(0.81)
    assert metrics["ema/lr-SGD"] == pytest.approx(0.2)
