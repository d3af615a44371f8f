"""A resumed fit never trains on from the EMA by accident, and a refused checkpoint writes nothing: a state that
lacks the training weights, a resume under another `name` or class, and corrupt states (format, counters, shapes,
dtypes, non-finite weights, mode, a list for a dict) are refused before the training weights go into the module;
`resume_from_ema=True` continues from the EMA on purpose. Also: a second fit of a `flat_parameters` module, teachers
frozen by a fit that fails before it starts, and a run shorter than `total_samples`."""

from __future__ import annotations

import copy
import math
import os
import stat
import subprocess
import sys
import tempfile
import warnings

import lightning as L
import pytest
import torch
from helpers import TinyBYOL, TinyModel, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_emascale import EMAScalingCallback, PostHocEMACallback
from lightning_emascale._lightning import SpawnedFitFile, _host, spawn_directory

MODEL_ENTRIES = "model_entries"  # what the checkpoint's model entries hold, in the callback's state

KEY = "EMAScalingCallback{'name': 'ema'}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of one epoch with `evaluate_with_ema`: its `state_dict` holds the EMA."""
    directory = tmp_path_factory.mktemp("ckpt")
    callback = EMAScalingCallback(momentum=0.9, optimizer_rule="sgd")
    checkpoint = ModelCheckpoint(dirpath=directory, save_last=True)
    make_trainer([callback, checkpoint], enable_checkpointing=True).fit(TinyModel())
    return torch.load(directory / "last.ckpt", weights_only=False)


def _write(checkpoint, path):
    torch.save(checkpoint, path)
    return path


def _resume(path, callback, max_epochs=2):
    model = TinyModel()
    trainer = make_trainer([callback], max_epochs=max_epochs)
    return model, trainer, lambda: trainer.fit(model, ckpt_path=path)


def test_a_new_checkpoint_says_what_its_model_entries_hold(saved):
    assert saved["callbacks"][KEY][MODEL_ENTRIES] == "ema"


@pytest.mark.parametrize("marker", [True, False], ids=["marked", "old-checkpoint"])
def test_a_state_without_the_training_weights_is_refused(saved, tmp_path, marker):
    checkpoint = copy.deepcopy(saved)
    state = checkpoint["callbacks"][KEY]
    del state["raw_state_dict"]
    if not marker:
        del state[MODEL_ENTRIES]  # written before the marker: the model entries equal the EMA
    path = _write(checkpoint, tmp_path / "no_raw.ckpt")
    _, _, fit = _resume(path, EMAScalingCallback(momentum=0.9, optimizer_rule="sgd"))
    with pytest.raises(RuntimeError, match=r"holds an EMA, not the training weights, and its state .* lacks the"):
        fit()


def test_resume_from_ema_continues_from_the_ema_on_purpose(saved, tmp_path):
    checkpoint = copy.deepcopy(saved)
    del checkpoint["callbacks"][KEY]["raw_state_dict"]
    path = _write(checkpoint, tmp_path / "no_raw.ckpt")

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.start = {k: v.clone() for k, v in pl_module.state_dict().items()}

    callback, spy = EMAScalingCallback(momentum=0.9, optimizer_rule="sgd", resume_from_ema=True), Spy()
    model = TinyModel()
    make_trainer([callback, spy], max_epochs=2).fit(model, ckpt_path=path)
    for name, value in checkpoint["callbacks"][KEY]["ema"].items():
        assert torch.equal(spy.start[name], value.to(spy.start[name].dtype)), name  # trained on from it
    assert callback.scaled_ema.optimizer_steps == 16  # and the EMA's clock resumed


@pytest.mark.parametrize("other", ["another-name", "another-class"])
def test_a_resume_with_another_callback_is_refused(saved, tmp_path, other):
    path = _write(saved, tmp_path / "ema.ckpt")
    if other == "another-name":
        callback = EMAScalingCallback(momentum=0.9, name="other")
    else:
        callback = PostHocEMACallback(sigma_rels=(0.05,), snapshot_every_samples=8, directory=tmp_path / "s")
    _, _, fit = _resume(path, callback)
    with pytest.raises(
        RuntimeError, match=r"its training weights are in the state \"EMAScalingCallback\{'name': 'ema'\}\""
    ):
        fit()


def test_a_resume_with_another_name_and_resume_from_ema_warns_and_trains_from_the_ema(saved, tmp_path):
    path = _write(saved, tmp_path / "ema.ckpt")
    _, _, fit = _resume(path, EMAScalingCallback(momentum=0.9, name="other", resume_from_ema=True))
    with pytest.warns(UserWarning, match=r"which are the EMA of \"EMAScalingCallback\{'name': 'ema'\}\""):
        fit()


def _nan(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[0] = math.nan
    return tensor


_CORRUPT = {
    "format": (lambda s: s.update(format=99), ValueError, r"has format 99"),
    "counter": (lambda s: s.update(samples_seen="many"), ValueError, r"samples_seen='many'"),
    "huge-counter": (lambda s: s.update(samples_seen=10**30), ValueError, r"samples_seen=1e\+30"),
    "steps-without-samples": (
        lambda s: s.update(optimizer_steps=0, ema_updates=0),
        ValueError,
        r"samples_seen=32 with optimizer_steps=0",
    ),
    "ema-shape": (
        lambda s: s["ema"].update({"net.0.weight": torch.zeros(3, 3)}),
        ValueError,
        r"ema\['net.0.weight'\] of shape \(3, 3\); the model's is \(8, 6\)",
    ),
    "ema-dtype": (
        lambda s: s["ema"].update({"net.0.weight": torch.zeros(8, 6, dtype=torch.int64)}),
        TypeError,
        r"ema\['net.0.weight'\] of dtype torch.int64; the model's is torch.float32",
    ),
    "ema-bool": (
        lambda s: s["ema"].update({"net.1.num_batches_tracked": torch.tensor(True)}),
        TypeError,
        r"of dtype torch.bool; the model's is torch.int64",
    ),
    "raw-nan": (
        lambda s: s["raw_state_dict"].update({"net.0.bias": _nan(s["raw_state_dict"]["net.0.bias"])}),
        ValueError,
        r"non-finite raw_state_dict\['net.0.bias'\]",
    ),
    "raw-unknown": (
        lambda s: s["raw_state_dict"].update({"nope": torch.zeros(1)}),
        KeyError,
        r"raw_state_dict\['nope'\], which TinyModel does not have",
    ),
    "raw-shape": (
        lambda s: s["raw_state_dict"].update({"net.0.bias": torch.zeros(3)}),
        ValueError,
        r"raw_state_dict\['net.0.bias'\] of shape \(3,\)",
    ),
    "mode": (lambda s: s.update(power_ema={}, samples_at_update=0), KeyError, r"holds the 'power_ema' tensors"),
}


@pytest.mark.parametrize("case", list(_CORRUPT))
def test_a_corrupt_state_is_refused_before_the_training_weights_are_written(saved, tmp_path, case):
    change, error, match = _CORRUPT[case]
    checkpoint = copy.deepcopy(saved)
    change(checkpoint["callbacks"][KEY])
    path = _write(checkpoint, tmp_path / "corrupt.ckpt")
    model, _, fit = _resume(path, EMAScalingCallback(momentum=0.9, optimizer_rule="sgd"))
    with pytest.raises(error, match=match):
        fit()
    for name, value in model.state_dict().items():  # as Lightning loaded it: no training weight written
        assert torch.equal(value, checkpoint["state_dict"][name]), name


def test_a_list_where_the_state_belongs_is_refused_by_name(saved, tmp_path):
    checkpoint = copy.deepcopy(saved)
    checkpoint["callbacks"][KEY] = [1, 2]
    path = _write(checkpoint, tmp_path / "list.ckpt")
    _, _, fit = _resume(path, EMAScalingCallback(momentum=0.9, optimizer_rule="sgd"))
    with pytest.raises(TypeError, match=r"The checkpoint's EMAScalingCallback\{'name': 'ema'\} state must be a dict"):
        fit()


@pytest.mark.parametrize("new_callback", [False, True], ids=["same-callback", "new-callback"])
def test_a_second_fit_of_a_flat_parameters_module_trains(new_callback):
    model = TinyModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        first = EMAScalingCallback(momentum=0.9, flat_parameters=True)
        second = EMAScalingCallback(momentum=0.9, flat_parameters=True) if new_callback else first
    make_trainer([first]).fit(model)
    make_trainer([second]).fit(model)  # K-fold / second stage: not refused as "tied"
    assert second.scaled_ema.ema_updates == 8


def test_teachers_frozen_by_a_fit_that_fails_before_it_starts_are_unfrozen():
    model = TinyBYOL()
    model.backbone_momentum.requires_grad_(True)  # I-JEPA-like: left trainable, frozen by the callback
    teachers = {"backbone": "backbone_momentum", "head": "head_momentum"}
    callback = EMAScalingCallback(momentum=0.9, teachers=teachers, freeze_teachers=True, optimizer_rule="adam")
    with pytest.raises(ValueError, match=r"AdamScalingRule|'adam'"):
        make_trainer([callback]).fit(model)  # SGD: the rule does not fit, when fit starts
    assert all(p.requires_grad for p in model.backbone_momentum.parameters())


def test_a_run_shorter_than_total_samples_warns_that_the_schedule_did_not_finish():
    callback = EMAScalingCallback(momentum=0.99, momentum_schedule="cosine", final_momentum=1.0, total_samples=320)
    with pytest.warns(
        UserWarning,
        match=r"the momentum schedule stopped at progress 0.1: the run trained on 32 samples of `total_samples`=320",
    ):
        make_trainer([callback]).fit(TinyModel())


def test_the_ddp_spawn_hand_off_file_is_private_and_stale_ones_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    handoff = SpawnedFitFile()
    assert not os.path.exists(spawn_directory(create=False))  # nothing on disk without ddp_spawn
    directory = spawn_directory(create=False)
    os.makedirs(directory, mode=0o755)  # left readable by others: tightened
    host = _host()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = os.path.join(directory, f"spawned-fit-{host}-{int(dead.stdout)}-0123.pt")  # left after a SIGKILL
    partial = os.path.join(directory, f".partial-{host}-{int(dead.stdout)}-x")
    live = os.path.join(directory, f"spawned-fit-{host}-{os.getpid()}-4567.pt")  # a run going on
    elsewhere = os.path.join(directory, f"spawned-fit-otherhost-{int(dead.stdout)}-89.pt")  # another host's
    for path in (stale, partial, live, elsewhere):
        open(path, "w").close()

    class Rank0:
        local_rank = 0

    handoff.clear(Rank0())
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert sorted(os.listdir(directory)) == sorted(os.path.basename(p) for p in (live, elsewhere))
    handoff.write(Rank0(), {"format": 1}, {"w": torch.ones(2)})
    assert stat.S_IMODE(os.stat(handoff.path).st_mode) == 0o600
    assert handoff.read(torch.device("cpu"))["state"] == {"format": 1}


def test_a_hand_off_directory_that_is_a_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    SpawnedFitFile()  # built without touching the disk
    open(spawn_directory(create=False), "w").close()

    class Rank0:
        local_rank = 0

    with pytest.raises(RuntimeError, match=r"where ddp_spawn's workers leave the EMA .* point TMPDIR"):
        SpawnedFitFile().clear(Rank0())


def test_a_state_that_lacks_an_ema_tensor_is_refused_before_anything_is_written(saved, tmp_path):
    checkpoint = copy.deepcopy(saved)
    del checkpoint["callbacks"][KEY]["ema"]["net.2.bias"]
    path = _write(checkpoint, tmp_path / "missing.ckpt")
    model, _, fit = _resume(path, EMAScalingCallback(momentum=0.9, optimizer_rule="sgd"))
    with pytest.raises(KeyError, match=r"lacks the EMA of \['net.2.bias'\], which this callback averages"):
        fit()
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][name]), name


def test_a_state_of_none_under_the_callbacks_key_is_refused_as_corrupt(saved, tmp_path):
    checkpoint = copy.deepcopy(saved)
    checkpoint["callbacks"][KEY] = None
    path = _write(checkpoint, tmp_path / "none.ckpt")
    _, _, fit = _resume(path, EMAScalingCallback(momentum=0.9, optimizer_rule="sgd"))
    with pytest.raises(TypeError, match=r"state must be a dict .*got NoneType"):
        fit()


def test_a_resume_that_adds_a_second_ema_callback_is_not_refused(saved, tmp_path):
    path = _write(saved, tmp_path / "ema.ckpt")
    first = EMAScalingCallback(momentum=0.9, optimizer_rule="sgd")
    second = EMAScalingCallback(momentum=0.5, name="b", evaluate_with_ema=False)  # new: starts from the weights
    model = TinyModel()
    with pytest.warns(UserWarning, match=r"no EMAScalingCallback\{'name': 'b'\} state .* from the loaded weights\.$"):
        make_trainer([first, second], max_epochs=2).fit(model, ckpt_path=path)
    assert first.scaled_ema.optimizer_steps == 16 and second.scaled_ema.optimizer_steps == 8


class _Annealed(TinyModel):
    def __init__(self):
        super().__init__()
        self.register_buffer("temperature", torch.tensor(2.0), persistent=False)
        self.register_buffer("mask", torch.tensor([0.0, -math.inf]))


def test_a_resume_keeps_working_with_a_non_persistent_buffer_in_include_and_an_infinite_mask(tmp_path):
    callback = EMAScalingCallback(momentum=0.9, include=["net", "temperature", "mask"])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer([callback, checkpoint], enable_checkpointing=True).fit(_Annealed())
    resumed = EMAScalingCallback(momentum=0.9, include=["net", "temperature", "mask"])
    make_trainer([resumed], max_epochs=2).fit(_Annealed(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.scaled_ema.optimizer_steps == 16


def test_no_unfinished_schedule_warning_after_a_smoke_test():
    callback = EMAScalingCallback(momentum=0.99, momentum_schedule="cosine", final_momentum=1.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer([callback], fast_dev_run=True).fit(TinyModel())
    assert not [w for w in record if "stopped at progress" in str(w.message)]
