"""The Fashion-MNIST loader of the evidence (Debian's ``dataset-fashion-mnist``, which ``.ci/run`` installs), its
errors, and one tiny study on the real images."""

import gzip
import json
import math
import sys

import pytest
import torch
from test_examples import EXAMPLES, run_example

sys.path.insert(0, str(EXAMPLES))
from emascale_examples import fashion_mnist
from emascale_examples.paired import floor_summary, gap_summary, verdict_text


def write_idx(path, tensor, magic, compress=True):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in tensor.shape)
    raw = header + bytes(tensor.flatten().tolist())
    path.write_bytes(gzip.compress(raw) if compress else raw)


def fake_split(folder, split, n):
    images = torch.arange(n * 28 * 28, dtype=torch.int64).remainder(256).reshape(n, 28, 28)
    labels = torch.arange(n).remainder(10)
    image_name, label_name = fashion_mnist.FILES[split]
    write_idx(folder / image_name, images, 0x0803)
    write_idx(folder / label_name, labels, 0x0801)
    return images, labels


def test_reads_the_idx_files_of_a_folder_as_floats_in_0_1_and_labels(tmp_path):
    images, labels = fake_split(tmp_path, "test", 12)
    x, y = fashion_mnist.load("test", tmp_path)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x.squeeze(1), images.float() / 255) and torch.equal(y, labels)
    write_idx(tmp_path / "plain", labels, 0x0801, compress=False)  # an uncompressed file too
    assert torch.equal(fashion_mnist.read_idx(tmp_path / "plain", 1).long(), labels)


def test_subset_draws_by_seed_and_leaves_out_excluded_indices(tmp_path):
    fake_split(tmp_path, "train", 40)
    first, second = fashion_mnist.subset("train", 10, 0, tmp_path), fashion_mnist.subset("train", 10, 0, tmp_path)
    assert torch.equal(first[2], second[2]) and len(set(first[2].tolist())) == 10
    assert not torch.equal(first[2], fashion_mnist.subset("train", 10, 1, tmp_path)[2])
    rest = fashion_mnist.subset("train", 30, 0, tmp_path, exclude=first[2])
    assert not set(rest[2].tolist()) & set(first[2].tolist())
    with pytest.raises(ValueError, match=r"n must be in \[1, 30\] for the train split, got 31"):
        fashion_mnist.subset("train", 31, 0, tmp_path, exclude=first[2])


def test_a_missing_folder_names_the_package_and_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        fashion_mnist.load("train", tmp_path / "nowhere")
    message = str(error.value)
    assert "Fashion-MNIST's train split is not in" in message and "train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message and str(fashion_mnist.DEBIAN_FOLDER) in message


def test_bad_files_and_splits_are_refused_with_what_was_found(tmp_path):
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        fashion_mnist.load("val", tmp_path)
    write_idx(tmp_path / "labels.gz", torch.arange(5), 0x0803)
    with pytest.raises(ValueError, match="magic number is 0x0803, expected 0x0801"):
        fashion_mnist.read_idx(tmp_path / "labels.gz", 1)
    raw = (0x0801).to_bytes(4, "big") + (9).to_bytes(4, "big") + bytes(5)
    (tmp_path / "short").write_bytes(raw)
    with pytest.raises(ValueError, match=r"holds 13 bytes, but its header \[9\] needs 17"):
        fashion_mnist.read_idx(tmp_path / "short", 1)
    fake_split(tmp_path, "test", 6)
    write_idx(tmp_path / fashion_mnist.FILES["test"][1], torch.arange(5), 0x0801)
    with pytest.raises(ValueError, match=r"holds 6 images but .* 5 labels"):
        fashion_mnist.load("test", tmp_path)


def test_the_installed_package_holds_fashion_mnist():
    """The real files (``.ci/run`` installs Debian's package): without them this fails with the install command."""
    x, y = fashion_mnist.load("test")
    assert x.shape == (10_000, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert y.bincount().tolist() == [1000] * 10  # the test split is balanced
    assert len(fashion_mnist.load("train")[1]) == 60_000


def test_a_verdict_is_fragile_where_the_floor_interval_changes_it():
    floor = floor_summary([0.010, 0.020, 0.030])
    assert floor == {"mean": 0.02, "min": 0.01, "max": 0.03, "per_seed": [0.010, 0.020, 0.030]}
    robust = gap_summary([0.004, 0.008], floor["mean"], (floor["min"], floor["max"]))
    assert robust["verdict"] == "kept" and robust["robust"] and robust["verdict_range"] == ["kept", "kept"]
    fragile = gap_summary([0.02, 0.04], floor["mean"], (floor["min"], floor["max"]))  # 1.5 F, at the line
    assert fragile["verdict"] == "kept" and fragile["verdict_range"] == ["kept", "inconclusive"]
    assert not fragile["robust"] and fragile["over_floor_range"] == pytest.approx([1.0, 3.0])
    assert verdict_text(fragile) == "1.5 (1.0-3.0) kept, fragile" and verdict_text(robust) == "0.3 (0.2-0.6) kept"


def test_the_polyak_study_runs_on_fashion_mnist_with_paired_seeds(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ("--fashion-mnist --seeds 2 --epochs 2 --train-samples 128 --val-samples 64 --record-every 64"
            " --kappas 2,4 --base-batch 8 --out-dir out")  # fmt: skip
    run_example("studies/polyak_paired.py", args, tmp_path, timeout=900)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    runs, summary = result["runs"], result["summary"]
    assert [(run["seed"], run["kappa"], run["arm"]) for run in runs] == [
        (seed, kappa, arm) for seed in range(2)
        for kappa, arm in [(1, "base"), (1, "floor"), (2, "rule"), (2, "no rule"), (4, "rule"), (4, "no rule")]
    ]  # fmt: skip
    by = {(run["seed"], run["kappa"], run["arm"]): run for run in runs}
    for seed in range(2):
        assert {run["raw_accuracy"][0] for run in runs if run["seed"] == seed} == {
            by[seed, 1, "base"]["raw_accuracy"][0]
        }
        for kappa in (2, 4):  # both arms train the same raw model: only the EMA differs
            assert by[seed, kappa, "rule"]["raw_accuracy"] == by[seed, kappa, "no rule"]["raw_accuracy"]
            assert by[seed, kappa, "rule"]["rho_hat"] == pytest.approx(0.99**kappa)
            assert by[seed, kappa, "no rule"]["rho_hat"] == 0.99
    assert all(run["samples"] == [0, 64, 128, 192, 256] for run in runs)
    floor = summary["floor"]["ema_accuracy"]
    assert floor["min"] <= floor["mean"] <= floor["max"] and len(floor["per_seed"]) == 2
    for cell in summary["arms"]:  # against F and each end of its per-seed interval
        if cell["arm"] != "base":
            gap = cell["ema_accuracy_gap"]
            assert gap["over_floor"] == pytest.approx(gap["mean"] / floor["mean"])
            ends = [gap["mean"] / f if f else math.inf for f in (floor["max"], floor["min"])]
            assert gap["over_floor_range"] == pytest.approx(ends)
    assert result["environment"]["torch_threads"] == 1 and "polyak_paired.py" in result["environment"]["command"]
    assert (tmp_path / "out" / "polyak_paired.png").read_bytes()[:4] == b"\x89PNG"


def test_the_pseudo_labelling_split_is_balanced_and_keeps_the_pool_apart():
    from emascale_examples.pseudo import few_label_fashion_mnist

    labeled, pool, held_out = few_label_fashion_mnist(seed=0, labeled=100, unlabeled=500, val=64)
    assert labeled.tensors[1].bincount().tolist() == [10] * 10 and labeled.tensors[0].shape == (100, 784)
    assert len(pool) == 500 and len(held_out) == 64
    rows = {tuple(row.tolist()) for row in labeled.tensors[0]}
    assert not rows & {tuple(row.tolist()) for row in pool.tensors[0]}  # no labelled image in the pool
    assert abs(float(pool.tensors[0].mean())) < 0.2  # standardized with the training split's statistics
    again = few_label_fashion_mnist(seed=0, labeled=100, unlabeled=500, val=64)
    assert torch.equal(again[0].tensors[0], labeled.tensors[0])
    assert not torch.equal(few_label_fashion_mnist(seed=1, labeled=100, unlabeled=500, val=64)[0].tensors[0],
                           labeled.tensors[0])  # fmt: skip
    with pytest.raises(ValueError, match="labeled must be a multiple of the 10 classes, got 105"):
        few_label_fashion_mnist(seed=0, labeled=105)


def test_byol_runs_every_growth_with_and_without_the_rule_on_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ("--fashion-mnist --every-growth --seeds 1 --epochs 3 --train-samples 64 --val-samples 32 --kappas 4"
            " --base-batch 8 --grow-at 1 --out-dir out")  # fmt: skip
    run_example("studies/byol_study.py", args, tmp_path, timeout=900)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    batches = {run["arm"]: [step["batch"] for step in run["steps_record"]] for run in result["runs"]}
    assert batches == {
        "base": [8] * 24, "floor": [8] * 24, "rule": [32] * 6, "no EMA rule": [32] * 6,
        "sharp, rule": [8] * 8 + [32] * 4, "sharp, no EMA rule": [8] * 8 + [32] * 4,
        "progressive": [8] * 8 + [16] * 4 + [32] * 2, "progressive, no EMA rule": [8] * 8 + [16] * 4 + [32] * 2,
    }  # fmt: skip
    for run in result["runs"]:  # the teacher's momentum: rho^kappa with the EMA rule, rho per step without it
        for step in run["steps_record"]:
            kappa = 1 if "no EMA rule" in run["arm"] else step["batch"] / 8
            assert step["rho_hat"] == pytest.approx(0.99**kappa)
    cells = {cell["arm"]: cell for cell in result["summary"]["arms"]}
    assert cells["sharp, rule"]["shares_base_prefix"] and not cells["rule"]["shares_base_prefix"]
    assert "robust" in cells["sharp, rule"]["knn_teacher_late_gap"]
