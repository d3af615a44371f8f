"""2-process CPU DDP, run in a subprocess with a timeout so that a hang can never stall the suite."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


#: What a gloo worker prints when it aborts at exit with threads still running, after it finished its work.
SHUTDOWN_ABORT = "terminate called without an active exception"


def run_script(script: str, *args: object, cwd: Path, timeout: int = 300, torchrun: bool = False) -> None:
    """Run ``script`` (beside this file) with ``args``; fail the test on a non-zero exit or after ``timeout``.

    ``torchrun``: launch 2 processes with ``torch.distributed.run`` (the script does not launch its own). A run that
    exits non-zero only because a worker aborted at shutdown (:data:`SHUTDOWN_ABORT`, no traceback) passes: its
    results are written, and the test reading them decides.
    """
    # the runner scripts import helpers.py from tests/ and the DeepSpeed shim beside them
    path = os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cpu"}
    launch = [sys.executable]
    if torchrun:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    try:
        proc = subprocess.run(
            [*launch, str(HERE / script), *map(str, args)],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:  # pragma: no cover - a hang is a failure, never a stall
        pytest.fail(f"{script} did not finish in {timeout} s: {err.stdout!r} {err.stderr!r}")
    # torchrun adds a traceback of its own when a worker exits non-zero: the workers' are the others
    tracebacks = proc.stderr.count("Traceback (most recent call last)") - proc.stderr.count("ChildFailedError:")
    aborted_at_exit = SHUTDOWN_ABORT in proc.stderr and tracebacks <= 0
    if proc.returncode != 0 and not aborted_at_exit:  # the first traceback names the cause; the tail is warnings
        start = proc.stderr.find("Traceback")
        pytest.fail(f"{script} exited with {proc.returncode}:\n{proc.stderr[max(start, 0) :][:6000]}")


def free_port() -> int:
    """A TCP port free now on this machine (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ddp_two_processes_kappa_counts_world_size(tmp_path):
    out = tmp_path / "result.pt"
    run_script("ddp_run.py", out, cwd=tmp_path)
    result = torch.load(out, weights_only=False)
    metrics = result["metrics"]
    # 24 samples per epoch split over 2 ranks, micro-batch 3, accumulation 2: 2 steps per epoch of 12 samples
    assert metrics["ema/kappa"] == 2.0
    assert metrics["ema/batch_size"] == 12
    assert metrics["ema/samples_seen"] == 48
    assert metrics["ema/momentum"] == pytest.approx(0.81)
    assert metrics["ema/lr-SGD"] == pytest.approx(0.2)


def test_ddp_progressive_batch_growth_and_bit_identical_resume(tmp_path):
    run_script("ddp_progressive_run.py", tmp_path, cwd=tmp_path, timeout=420)
    shuffled = torch.load(tmp_path / "shuffled.pt", weights_only=False)
    assert [kappa for _, _, kappa, _ in shuffled["rows"]] == [1.0] * 8 + [2.0] * 4 + [4.0] * 2
    assert len({tuple(ids) for ids in shuffled["epoch_ids"].values()}) == 3  # a new order every epoch
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    # per-device 2, 4, 8 on 2 ranks = global 4, 8, 16 against base 4; 16 samples per rank per epoch
    assert [(epoch, kappa) for epoch, _, kappa, _ in full["rows"]] == [(0, 1.0)] * 8 + [(1, 2.0)] * 4 + [(2, 4.0)] * 2
    assert full["rows"][-1][1] == 96  # samples seen: 3 epochs x 32
    assert full["batch_size"] == resumed["batch_size"] == 8
    # resumed after step 10 (mid-epoch 1): the same remaining steps, then bit-identical weights and EMA
    assert resumed["rows"] == full["rows"][10:]
    assert resumed["epoch_ids"][1] == full["epoch_ids"][1][-8:]  # the rest of the interrupted epoch
    assert resumed["epoch_ids"][2] == full["epoch_ids"][2]
    for name, value in full["raw"].items():
        assert torch.equal(resumed["raw"][name], value), name
    for name, value in full["ema"].items():
        assert torch.equal(resumed["ema"][name], value), name


def test_ddp_dino_center_with_accumulation_equals_the_run_without(tmp_path):
    """2 ranks × 2 accumulated micro-batches of 4 with `center_momenta` against 2 ranks × one batch of 8 with lightly's
    own centre update (one update per step with the mean over both ranks: the large-batch run). The intercepted update
    runs lightly's all-reduce, so the centre, the teacher and the weights are those of the run without accumulation."""
    results = {}
    for mode in ("accumulate", "whole", "plain"):
        out = tmp_path / f"{mode}.pt"
        run_script("ddp_dino_center_run.py", out, mode, cwd=tmp_path)
        results[mode] = torch.load(out, weights_only=False)
    assert results["accumulate"]["checks"] == 16 and results["whole"]["checks"] == 8  # every micro-batch checked
    whole = results["whole"]["state"]
    assert whole["criterion.center"].abs().max() > 0.01  # the centre moved

    def gap(mode: str, name: str) -> float:  # relative to the tensor's scale: lr 0.5 grows rounding over 8 steps
        return float((results[mode]["state"][name] - whole[name]).abs().max() / whole[name].abs().max().clamp(min=1))

    assert max(gap("accumulate", name) for name in whole) < 1e-5  # measured 3e-6
    assert gap("plain", "criterion.center") > 1e-3  # lightly alone, accumulating: two centre updates per step


def test_ddp_update_bn_at_end_gives_every_rank_the_mean_of_the_ranks_statistics(tmp_path):
    """Each rank runs its shard of the training data through the EMA weights; the statistics are then averaged over
    the ranks, so every rank holds the same EMA (each rank's own differ)."""
    out = tmp_path / "bn.pt"
    run_script("ddp_update_bn_run.py", out, cwd=tmp_path)
    ranks = [torch.load(f"{out}.{rank}", weights_only=False) for rank in (0, 1)]
    for key in ("net.1.running_mean", "net.1.running_var"):
        assert torch.equal(ranks[0]["averaged"][key], ranks[1]["averaged"][key]), key
        assert not torch.equal(ranks[0]["own"][key], ranks[1]["own"][key]), key
        mean = (ranks[0]["own"][key] + ranks[1]["own"][key]) / 2
        torch.testing.assert_close(ranks[0]["averaged"][key], mean, rtol=1e-6, atol=1e-7, msg=key)


def test_ddp_teachers_stay_identical_across_ranks(tmp_path):
    out = tmp_path / "teacher.pt"
    run_script("ddp_teacher_run.py", out, cwd=tmp_path)
    result = torch.load(out, weights_only=False)
    assert result["checks"] == 8  # 16 samples per rank per epoch in batches of 4, 2 epochs: checked every step
    assert result["moved"]  # the teacher followed the (DDP-synchronised) student


def test_fabric_ddp_two_processes_kappa_counts_both_ranks_and_the_ema_matches_one_process(tmp_path):
    out = tmp_path / "fabric.pt"
    run_script("fabric_ddp_run.py", out, cwd=tmp_path)
    result = torch.load(out, weights_only=False)
    assert result["kappas"] == [2.0] * 4
    assert (result["samples_seen"], result["steps"]) == (48, 4)
    assert max(result["errors"].values()) < 1e-6


def test_ddp_post_hoc_snapshots_are_written_by_rank_zero_and_reconstruct(tmp_path):
    from lightning_emascale import reconstruct_post_hoc

    run_script("ddp_post_hoc_run.py", tmp_path, cwd=tmp_path)
    # per rank 12 samples per epoch, micro-batch 3, accumulation 2: global steps of 12, a snapshot at each
    names = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert [int(name[9:-3]) for name in names] == [12, 24, 36, 48]
    assert (tmp_path / "writer-0.txt").read_text().split() == ["12", "24", "36", "48"]
    assert not (tmp_path / "writer-1.txt").exists()
    assert reconstruct_post_hoc(tmp_path / "snapshots", sigma_rel=0.05).residual < 1e-6


def test_ddp_spawn_evaluation_after_fit_uses_the_ema_from_the_workers(tmp_path):
    run_script("ddp_spawn_eval_run.py", tmp_path, cwd=tmp_path, timeout=420)
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    # trainer.validate(model) in the main process evaluated the raw weights before, silently
    assert result["validated"] == pytest.approx(result["expected"], rel=1e-5)
    assert result["single"] == pytest.approx(result["expected"], rel=1e-5)  # one device, in the main process
    assert result["validated"] != pytest.approx(result["raw"], rel=1e-3)
    assert "ddp_spawn" in result["message"] and "checkpoint" in result["message"]
    for said in result["clock"]:  # the clock's properties say so too, rather than 0 or nan
        assert said.startswith("The EMA and its clock (samples seen, kappa, ...) stayed in the worker processes"), said
    assert result["stale"] == pytest.approx(result["loaded"], rel=1e-5)  # not the workers' stale EMA
