import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_emascale import WarmupCosine

EXAMPLES = Path(__file__).parents[2] / "examples"


def run_example(script: str, args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``examples/<script> <args>`` in ``cwd`` as a user would; a failure shows the end of its stderr. The
    full studies under ``-m slow`` pass a longer ``timeout``."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args.split()],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quickstart_runs_and_reports_the_scaled_momentum(tmp_path):
    proc = run_example("quickstart.py", "--epochs 1 --batch-size 64 --accumulate 2", tmp_path)
    assert "full step: global batch 128 = kappa 4 x base 32" in proc.stdout
    assert "rho^kappa = 0.960596" in proc.stdout  # 0.99 ** 4
    assert "samples seen 7373 in 58 optimizer steps" in proc.stdout  # 90% of 8192 samples, 64 x 2 per step


def test_progressive_example_writes_the_plot_and_reports_transitions(tmp_path):
    args = "--epochs 3 --schedule 0:32,1:64,2:128 --samples 1300 --out plot.png"
    proc = run_example("progressive.py", args, tmp_path)
    # 90% of 1300 = 1170 training samples per epoch; a row per epoch's first step, kappa from the base batch 32
    first, short = proc.stdout.split("first step of each epoch")[1].split("short last step of each epoch")
    first_steps = [line.split()[:4] for line in first.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert first_steps == [["0", "0", "32", "1"], ["1", "1170", "64", "2"], ["2", "2340", "128", "4"]]
    # 1170 = 36 x 32 + 18 = 18 x 64 + 18 = 9 x 128 + 18: each epoch's last step has 18 samples, kappa 18/32, and
    # the output says so (the figure marks these steps apart from the line instead of drawing them as spikes)
    short_steps = [line.split()[:4] for line in short.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert short_steps == [["0", "1152", "18", "0.5625"], ["1", "2322", "18", "0.5625"], ["2", "3492", "18", "0.5625"]]
    assert "rho-hat = rho^kappa is nearer 1" in short
    assert "total: 3510 samples in 66 optimizer steps, progress 1.000" in proc.stdout
    png = tmp_path / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


@pytest.mark.parametrize(
    ("script", "online", "teacher"),
    [("byol.py", "backbone", "momentum backbone"), ("dino.py", "student backbone", "teacher backbone")],
)
def test_self_supervised_examples_run_on_generated_images(tmp_path, script, online, teacher):
    args = "--epochs 2 --schedule 0:8,1:16 --train-samples 64 --out plot.png --record run.json"
    proc = run_example(script, args, tmp_path)
    assert "total: 128 samples in 12 optimizer steps, progress 1.000" in proc.stdout  # 8 steps of 8, 4 of 16
    accuracy = re.search(rf"{teacher} (\d\.\d+)", proc.stdout)
    assert accuracy and 0.0 <= float(accuracy.group(1)) <= 1.0, proc.stdout[-2000:]
    assert "= 16 samples per optimizer step (was 8 x 1), kappa 2 for 'ema'" in proc.stderr
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"

    # What the figure draws: one row per optimizer step (mechanics, loss, teacher lag), kNN at the start and per epoch
    run = json.loads((tmp_path / "run.json").read_text())
    steps = run["steps"]
    assert [(s["global_batch"], s["kappa"], s["epoch"]) for s in steps] == [(8, 1, 0)] * 8 + [(16, 2, 1)] * 4
    assert [s["samples_before"] for s in steps] == [8 * i for i in range(8)] + [64 + 16 * i for i in range(4)]
    assert all(math.isfinite(s["loss"]) for s in steps)
    if script == "byol.py":  # the negative cosine similarity of the prediction and the teacher's projection
        assert all(-1.0 <= s["loss"] <= 1.0 for s in steps)
    else:  # the loss the figure splits: the targets' entropy plus the KL the student can reduce
        assert all(s["loss"] == pytest.approx(s["teacher_entropy"] + s["kl"], abs=1e-4) for s in steps)
    assert "what the run shows:" in proc.stdout  # the output says what the user is looking at
    # after every step the teacher trails the online network, by a small fraction of its weights
    assert all(0.0 < s["teacher_lag"] < 0.5 for s in steps), [s["teacher_lag"] for s in steps]
    knn = run["knn"]
    assert [point["samples_seen"] for point in knn] == [0, 64, 128]
    assert all(0.0 <= point[key] <= 1.0 for point in knn for key in ("online", "teacher"))
    assert knn[0]["online"] == knn[0]["teacher"]  # the teacher starts as a copy of the online network
    final = re.search(rf"{online} (\d\.\d+), {teacher} (\d\.\d+)", proc.stdout)
    assert final, proc.stdout[-2000:]
    assert (float(final.group(1)), float(final.group(2))) == pytest.approx(
        (knn[-1]["online"], knn[-1]["teacher"]), abs=5e-5
    )


@pytest.mark.parametrize("config", sorted((EXAMPLES / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_parses_and_runs_one_step(tmp_path, config):
    proc = run_example("cli.py", f"fit --config={config} --trainer.fast_dev_run=1", tmp_path)
    assert "`max_steps=1` reached" in proc.stderr
    assert "samples per optimizer step, kappa 1 for 'ema'" in proc.stderr


def test_cli_saves_each_runs_config_in_its_own_log_dir_and_never_overwrites_one(tmp_path):
    # A user's own config named config.yaml, in the directory they run from
    user_config = tmp_path / "config.yaml"
    user_config.write_bytes((EXAMPLES / "configs" / "supervised.yaml").read_bytes() + b"# my own copy\n")
    original = user_config.read_bytes()
    small = "--trainer.max_epochs=1 --data.samples=256"
    run_example("cli.py", f"fit --config config.yaml {small} --model.lr=0.03", tmp_path)
    run_example("cli.py", f"fit --config config.yaml {small} --model.lr=0.04", tmp_path)
    assert user_config.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "lightning_logs"]
    # one directory per run, each with the config it ran with (overrides included) next to its metrics
    runs = tmp_path / "lightning_logs" / "supervised"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    for version, lr in (("version_0", "0.03"), ("version_1", "0.04")):
        assert f"lr: {lr}" in (runs / version / "config.yaml").read_text()
        assert (runs / version / "metrics.csv").is_file()

    # Saved into the working directory itself (no logger, default_root_dir "."): refused before training
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "cli.py"), "fit", "--config", "config.yaml", *small.split(),
         "--trainer.logger=false", "--trainer.default_root_dir=."],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0 and "Aborting to avoid overwriting" in proc.stderr, proc.stderr[-3000:]
    assert user_config.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "lightning_logs"]


def test_plain_pytorch_loop_scales_the_step_and_imports_no_lightning(tmp_path):
    script = EXAMPLES / "plain_pytorch.py"
    code = (
        "import runpy, sys; sys.argv = [sys.argv[0], *sys.argv[1:]];"
        f" runpy.run_path({str(script)!r}, run_name='__main__');"
        " print('lightning imported:', any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))"
    )
    args = ["--batch-size", "32", "--accumulate", "4", "--epochs", "1"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["1"]]
    assert rows == [["1", "128", "128", "4", "0.960596", "0.2000"]]  # base 32: kappa 4, 0.99^4, lr 0.05 x 4
    assert "total: 4096 samples in 32 optimizer steps" in proc.stdout
    assert re.search(r"epoch 0: held-out accuracy raw 0\.\d+, EMA 0\.\d+", proc.stdout)
    assert "lightning imported: False" in proc.stdout


@pytest.mark.parametrize(("devices", "first"), [("1", "batch 32 kappa 1"), ("2", "batch 64 kappa 1")])
def test_fabric_loop_grows_the_batch_and_runs_the_lr_on_the_sample_clock(tmp_path, devices, first):
    args = f"--devices {devices} --strategy {'ddp' if devices == '2' else 'auto'} --epochs 2 --schedule 0:32,1:64 --samples 1024"
    proc = run_example("fabric.py", args, tmp_path)
    assert f"epoch 0: {first} rho-hat 0.990000" in proc.stdout
    assert "epoch 1: batch" in proc.stdout and " kappa 2 rho-hat 0.980100" in proc.stdout
    assert "samples 2048 progress 1.000" in proc.stdout  # the cosine LR ends exactly at the last sample
    # the last step's LR: 0.05 x the schedule at the samples seen before it, x kappa 2 (SGD rule)
    last_batch = 64 * int(devices)
    expected = 0.05 * WarmupCosine(warmup=0.1, final=0.05)((2048 - last_batch) / 2048) * 2
    assert float(re.search(r"epoch 1: .* lr (\d\.\d+)", proc.stdout).group(1)) == pytest.approx(expected, abs=1e-4)


def test_post_hoc_example_sweeps_lengths_after_one_run(tmp_path):
    args = "--epochs 2 --samples 2048 --snapshot-every 512 --snapshots snaps --out plot.png"
    proc = run_example("post_hoc.py", args, tmp_path)
    # the run's kappa: 1 on its full steps of 32 (base 32), the short last step of each epoch (1844 = 57 x 32 + 20)
    # apart, rather than the last step's kappa alone
    assert (
        "trained on 3688 samples in 116 optimizer steps, base batch 32: kappa 1 on 114 steps of 32 samples;"
        " kappa 0.625 on 2 short last steps of an epoch (20 samples)\n"
    ) in proc.stdout
    rows = re.findall(r"^\s+(sigma_rel|half_life_samples) ([\d.]+)\s+([\d.]+)\s+([\d.]+)", proc.stdout, re.M)
    assert len(rows) == 12
    residuals = {(kind, float(value)): float(residual) for kind, value, residual, _ in rows}
    assert residuals[("sigma_rel", 0.05)] < 1e-4 and residuals[("sigma_rel", 0.1)] < 1e-4  # the tracked lengths
    # every fit with residual > 0.1, and only those, is flagged in the table as drawn apart in the figure
    flagged = re.findall(
        r"^\s+(\w+) ([\d.]+) .*\(residual > 0\.1: poor fit, not chosen; hollow grey", proc.stdout, re.M
    )
    assert {(kind, float(value)) for kind, value in flagged} == {key for key, r in residuals.items() if r > 0.1}
    assert flagged, "this run has poor fits (the longest half-lives): the check above must not pass vacuously"
    assert re.search(r"^best: \w+ [\d.]+ \(validation accuracy 0\.\d+, residual 0\.0\d+\)$", proc.stdout, re.M)
    # 2 epochs of the 1844 training samples (random_split of 90 % of 2048): a snapshot every 512, one at the end
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir())[-1] == "post_hoc-000000000003688.pt"
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_pseudo_label_counts_kappa_on_the_unlabeled_stream_and_pseudo_labels_help(tmp_path):
    proc = run_example("pseudo_label.py", "--epochs 3 --batch-size 64", tmp_path)
    lines = [line for line in proc.stdout.splitlines() if "kappa" in line]
    assert len(lines) == 2 and all("kappa 2, rho-hat 0.980100" in line for line in lines)  # 64 unlabelled / 32
    final = [float(line.split("teacher validation accuracy ")[1].split()[0]) for line in lines]
    assert final[1] > final[0] + 0.05  # pseudo-labels beat the labels alone on this task
    assert proc.stdout.count("no collapse: the teacher's most common label covers") == 2  # said for each arm


@pytest.mark.parametrize(
    ("flag", "kappa"), [("", "global batch 128, kappa 2"), ("--tensor-parallel", "global batch 64, kappa 1")]
)
def test_sharded_example_keeps_each_ranks_shard_and_checkpoints_the_gathered_ema(tmp_path, flag, kappa):
    # 2 CPU processes: FSDP2 over both (2 data-parallel replicas), or tensor parallel (one sample stream)
    proc = run_example("sharded.py", f"--epochs 2 --samples 2048 {flag}", tmp_path)
    assert f"last step: {kappa}" in proc.stdout
    sizes = re.findall(r"^rank (\d): EMA ([\d.]+) MiB, parameter shard ([\d.]+) MiB$", proc.stdout, re.M)
    assert [rank for rank, _, _ in sizes] == ["0", "1"]
    assert all(ema == shard for _, ema, shard in sizes)  # each rank holds the EMA of its own shard only
    validated = re.search(r"validation accuracy of the EMA: ([\d.]+)", proc.stdout).group(1)
    assert f"checkpoint loaded as a plain model (the EMA): accuracy {validated}" in proc.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (`deepspeed` extra)"
)
@pytest.mark.parametrize(("stage", "kib"), [(3, "142.0"), (2, "284.0")])
def test_deepspeed_example_keeps_each_ranks_partition_and_consolidates_the_ema(tmp_path, stage, kib):
    launcher = Path(__file__).parent / "deepspeed_example_launcher.py"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher), str(EXAMPLES / "deepspeed_zero.py"), "--stage", str(stage), "--epochs", "1", "--out", "ckpt"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 2 ranks x micro-batch 32 x 2 micro-batches against base 32
    assert "last step: global batch 128, kappa 4, rho-hat 0.960596" in proc.stdout
    # ZeRO-3: half the fp32 model on each rank (the 72,714 parameters split evenly); ZeRO-2: the whole EMA
    assert f"rank 0: EMA {kib} KiB of the full fp32 model's 284.0 KiB" in proc.stdout
    assert f"rank 1: EMA {kib} KiB" in proc.stdout
    swapped = re.search(r"training weights [\d.]+, EMA ([\d.]+)", proc.stdout)  # evaluated inside ema.swapped()
    assert swapped is not None, proc.stdout
    assert f"consolidated EMA on one process: accuracy {swapped.group(1)}" in proc.stdout
