"""PostHocEMACallback in the Trainer: snapshots on the sample clock, reconstruction, exact resume."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import TinyModel, make_trainer
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_emascale import PostHocEMACallback, ProgressiveBatchCallback, reconstruct_post_hoc
from lightning_emascale.post_hoc import write_snapshot

DATA = Path(__file__).parents[1] / "data"


def fit(directory, max_epochs, ckpt_path=None, save=None, **kwargs):
    L.seed_everything(0)
    model = TinyModel(n_samples=32, batch_size=4)
    callback = PostHocEMACallback(snapshot_every_samples=24, directory=directory, base_batch_size=8, **kwargs)
    trainer = make_trainer([callback], max_epochs=max_epochs, accumulate_grad_batches=2)
    trainer.fit(model, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model, callback


def snapshots(directory):
    return {p.name: torch.load(p, weights_only=True) for p in sorted(directory.iterdir())}


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def run_id(callback):
    return callback.scaled_ema.averager.run_id


def test_snapshots_on_the_sample_clock_and_at_the_end_reconstruct_the_tracked_emas(tmp_path):
    model, callback = fit(tmp_path, max_epochs=2)  # 64 samples in steps of 8
    assert callback.sigma_rels == (0.05, 0.1) and callback.kappa == 1.0
    assert [int(name[9:-3]) for name in snapshots(tmp_path)] == [24, 48, 64]  # every 24 samples, and the end
    for sigma_rel, state in zip(callback.sigma_rels, callback.scaled_ema.averager.states):
        rebuilt = reconstruct_post_hoc(tmp_path, sigma_rel=sigma_rel)
        assert rebuilt.residual < 1e-6
        for name, value in state.averages_by_name().items():
            torch.testing.assert_close(rebuilt[name], value, rtol=1e-5, atol=1e-6, msg=name)
    model.load_state_dict(reconstruct_post_hoc(tmp_path, sigma_rel=0.08))
    assert "post_hoc/kappa" in model.trainer.callback_metrics
    with pytest.raises(RuntimeError, match=r"A post-hoc EMA keeps power EMAs, not one EMA"):
        callback.ema_state_dict()


def test_resume_mid_run_writes_the_same_snapshots(tmp_path):
    fit(tmp_path / "full", max_epochs=4)
    fit(tmp_path / "resumed", max_epochs=2, save=tmp_path / "half.ckpt")
    fit(tmp_path / "resumed", max_epochs=4, ckpt_path=tmp_path / "half.ckpt")
    full, resumed = snapshots(tmp_path / "full"), snapshots(tmp_path / "resumed")
    assert [int(name[9:-3]) for name in full] == [24, 48, 72, 96, 120, 128]
    assert set(resumed) - set(full) == {"post_hoc-000000000000064.pt"}  # where the first fit ended
    for name, snapshot in full.items():
        for a, b in zip(snapshot["averages"], resumed[name]["averages"]):
            assert all(torch.equal(a[k], b[k]) for k in a), name


def test_progressive_growth_keeps_snapshots_on_samples_not_steps(tmp_path):
    L.seed_everything(0)
    model = TinyModel(n_samples=32, batch_size=4)
    callback = PostHocEMACallback(snapshot_every_samples=20, directory=tmp_path, base_batch_size=4)
    growth = ProgressiveBatchCallback({0: 4, 1: 8, 2: 16})
    make_trainer([growth, callback], max_epochs=3).fit(model)
    # steps of 4, then 8, then 16 samples: a snapshot at the first update at or after every 20 samples
    assert [int(name[9:-3]) for name in snapshots(tmp_path)] == [20, 40, 64, 80, 96]
    assert callback.kappa == 4.0


def test_post_hoc_arguments_are_checked_when_built(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"`sigma_rels` must be a non-empty sequence of lengths, each in \(0, 1/sqrt\(12\) = 0.288675\] \(EDM2"
        r" tracks \(0.05, 0.10\)\): PostHocEMACallback tracks one power EMA per length, got None",
    ):
        PostHocEMACallback(sigma_rels=None, directory=tmp_path)
    with pytest.raises(ValueError, match=r"`snapshot_every_samples` must be a positive integer, got -5"):
        PostHocEMACallback(snapshot_every_samples=-5, directory=tmp_path)
    with pytest.raises(ValueError, match=r"`sigma_rel` must be in \(0, 1/sqrt\(12\) = 0.288675\]"):
        PostHocEMACallback(sigma_rels=(0.05, 0.4), directory=tmp_path)


def test_post_hoc_takes_the_selection_and_the_non_finite_guard(tmp_path):
    _, callback = fit(tmp_path, max_epochs=1, exclude=["net.2"], skip_non_finite=True)
    rebuilt = reconstruct_post_hoc(tmp_path, sigma_rel=0.08)
    assert not any(name.startswith("net.2.") for name in rebuilt) and "net.0.weight" in rebuilt
    assert (callback.exclude, callback.skip_non_finite, callback.scaled_ema.skipped_updates) == (("net.2",), True, 0)


# ----------------------------------------------------------------------------------- the snapshot directory
def test_a_post_hoc_directory_of_another_run_is_refused_before_anything_changes(tmp_path):
    first = PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)
    make_trainer([first]).fit(TinyModel())
    written = files(tmp_path)
    model = TinyModel()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=rf"`directory`='{re.escape(os.fspath(tmp_path))}' holds post-hoc snapshots of another run:"
        rf" post_hoc-000000000000016.pt \(run {run_id(first)}; this run: run [0-9a-f]{{32}}\)\. Its snapshots would"
        r" mix with them, and `reconstruct_post_hoc` would combine both runs\. Give this run a new `directory` \(or"
        r" move the other run's snapshots out\), or resume the run that wrote them from its own checkpoint",
    ):
        make_trainer([PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)]).fit(model)
    assert files(tmp_path) == written
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in before.items())


def test_a_resume_into_the_directory_of_another_run_is_refused(tmp_path):
    _, mine = fit(tmp_path / "mine", max_epochs=1, save=tmp_path / "mine.ckpt")
    _, other = fit(tmp_path / "other", max_epochs=1)
    written = files(tmp_path / "other")
    L.seed_everything(0)
    model = TinyModel(n_samples=32, batch_size=4)
    callback = PostHocEMACallback(snapshot_every_samples=24, directory=tmp_path / "other", base_batch_size=8)
    with pytest.raises(
        ValueError,
        match=rf"`directory`='.*other' holds post-hoc snapshots of another run: post_hoc-000000000000024.pt \(run"
        rf" {run_id(other)}; this run: run {run_id(mine)}\)\.",
    ):
        make_trainer([callback], max_epochs=2, accumulate_grad_batches=2).fit(model, ckpt_path=tmp_path / "mine.ckpt")
    assert files(tmp_path / "other") == written
    saved = torch.load(tmp_path / "mine.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())  # no step taken


def test_a_checkpoint_from_before_run_ids_resumes_into_the_snapshots_it_wrote(tmp_path):
    sys.path.insert(0, str(DATA))
    import make_pre_protocol_checkpoints as pre_protocol

    checkpoint = DATA / "pre_protocol_post_hoc.ckpt"
    assert (
        "run_id"
        not in torch.load(checkpoint, weights_only=False)["callbacks"]["PostHocEMACallback{'name': 'post_hoc'}"]
    )
    pre_protocol.run("post_hoc", 1, tmp_path / "old")  # the snapshots of its first epoch, as that code wrote them:
    for path in (tmp_path / "old").iterdir():  # without a run id
        snapshot = torch.load(path, weights_only=True)
        del snapshot["run_id"]
        torch.save(snapshot, path)
    _, _, callback = pre_protocol.run("post_hoc", 2, tmp_path / "old", ckpt_path=checkpoint)
    assert run_id(callback) is None
    written = snapshots(tmp_path / "old")
    assert len(written) == 4 and not any("run_id" in snapshot for snapshot in written.values())
    assert reconstruct_post_hoc(tmp_path / "old", sigma_rel=0.05).residual < 1e-6
    # snapshots with a run id are another run's to it
    pre_protocol.run("post_hoc", 1, tmp_path / "new")
    with pytest.raises(
        ValueError,
        match=r"post_hoc-000000000000016.pt \(run [0-9a-f]{32}; this run: no run id, resumed from a state saved"
        r" before run ids\)\.",
    ):
        pre_protocol.run("post_hoc", 2, tmp_path / "new", ckpt_path=checkpoint)


def test_a_snapshot_of_another_run_written_mid_fit_stops_the_fit_before_the_next_snapshot(tmp_path):
    class Intruder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:  # after the first step, 4 samples: the next snapshot falls at 16
                averages = {name: value.clone() for name, value in pl_module.state_dict().items()}
                write_snapshot(tmp_path, 2, (0.05, 0.1), [averages, averages], run_id="intruder")

    callback = PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)
    with pytest.raises(
        ValueError,
        match=rf"`directory`='{re.escape(os.fspath(tmp_path))}' holds post-hoc snapshots of another run:"
        r" post_hoc-000000000000002.pt \(run intruder; this run: run [0-9a-f]{32}\)",
    ):
        make_trainer([callback, Intruder()]).fit(TinyModel())
    assert callback.samples_seen == 12  # refused before the step to 16 samples
    assert [path.name for path in tmp_path.iterdir()] == ["post_hoc-000000000000002.pt"]


def test_a_leftover_temporary_file_is_no_snapshot_of_another_run(tmp_path):
    (tmp_path / "post_hoc-000000000000016.tmp").write_bytes(b"")  # a write killed before its rename
    make_trainer([PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)]).fit(TinyModel())
    assert [path.name for path in sorted(tmp_path.glob("*.pt"))] == [
        "post_hoc-000000000000016.pt", "post_hoc-000000000000032.pt"
    ]  # fmt: skip


def test_a_smoke_test_writes_no_post_hoc_snapshots(tmp_path):
    make_trainer([PostHocEMACallback(snapshot_every_samples=4, directory=tmp_path)], fast_dev_run=1).fit(TinyModel())
    assert not list(tmp_path.iterdir())
    make_trainer([PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)]).fit(TinyModel())  # not refused
    assert len(list(tmp_path.iterdir())) == 2


def test_a_resume_from_an_earlier_checkpoint_rewrites_the_snapshots_of_the_abandoned_attempt(tmp_path):
    directory = tmp_path / "snapshots"

    class SetLR(L.Callback):
        def __init__(self, lr):
            self.lr = lr

        def on_train_start(self, trainer, pl_module):  # after the optimizer's state (its lr) is restored
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr

    def attempt(lr):
        """The run resumed from its checkpoint at 32 samples, to 64 with ``lr`` (a snapshot at 48 and at the end)."""
        L.seed_everything(0)
        callback = PostHocEMACallback(snapshot_every_samples=24, directory=directory, base_batch_size=8)
        trainer = make_trainer([callback, SetLR(lr)], max_epochs=2, accumulate_grad_batches=2)
        trainer.fit(TinyModel(n_samples=32, batch_size=4), ckpt_path=tmp_path / "32.ckpt")
        return [state.averages_by_name() for state in callback.scaled_ema.averager.states]

    fit(directory, max_epochs=1, save=tmp_path / "32.ckpt")
    first = attempt(lr=0.1)
    second = attempt(lr=0.3)  # the same run from 32 samples again, with another lr: its own snapshots from there
    assert not torch.equal(first[0]["net.0.weight"], second[0]["net.0.weight"])
    written = snapshots(directory)
    assert [int(name[9:-3]) for name in written] == [24, 32, 48, 64]
    for saved, tracked in zip(written["post_hoc-000000000000064.pt"]["averages"], second):  # the end: the last EMAs
        assert all(torch.equal(saved[name], value) for name, value in tracked.items())
    for saved, tracked in zip(written["post_hoc-000000000000048.pt"]["averages"], first):
        assert not torch.equal(saved["net.0.weight"], tracked["net.0.weight"])


class RecordingStrategy(SingleDeviceStrategy):
    """One process, whose ``broadcast`` records what is sent; ``said``: what rank 0 answers to the outcome of a check
    (this is another rank). Lightning broadcasts its root directory (a str) too."""

    def __init__(self, said=None):
        super().__init__(device=torch.device("cpu"))
        self.sent, self.said = [], said

    def broadcast(self, obj, src=0):
        self.sent.append((obj, src))
        return self.said if self.said is not None and not isinstance(obj, str) else obj

    def outcomes(self):
        return [(obj, src) for obj, src in self.sent if not isinstance(obj, str)]


def test_the_refusal_of_a_directory_is_broadcast_from_rank_zero_so_that_every_rank_raises_it(tmp_path):
    first = PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)
    make_trainer([first]).fit(TinyModel())
    strategy = RecordingStrategy()
    refused = rf"`directory`='.*' holds post-hoc snapshots of another run: post_hoc-0+16.pt \(run {run_id(first)};"
    with pytest.raises(ValueError, match=refused):
        make_trainer([PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)], strategy=strategy).fit(
            TinyModel()
        )
    (((kind, message), src),) = strategy.outcomes()
    assert kind == "ValueError" and re.match(refused, message) and src == 0
    # another rank, whose own check reads nothing, raises what rank 0 found, before any step
    said = ("ValueError", "`directory`='elsewhere' holds post-hoc snapshots of another run: post_hoc-0016.pt")
    model = TinyModel()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    callback = PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path / "clean")
    with pytest.raises(ValueError, match=re.escape(said[1])):
        make_trainer([callback], strategy=RecordingStrategy(said=said)).fit(model)
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in before.items())
    said = ("PermissionError", "[Errno 13] Permission denied: 'snapshots'")  # rank 0 could not list it
    with pytest.raises(RuntimeError, match=r"Rank 0 could not check `directory`='.*clean': PermissionError: \[Errno"):
        make_trainer([callback], strategy=RecordingStrategy(said=said)).fit(model)
    # a clean directory: the outcome (none) is broadcast all the same, and the fit goes on
    strategy = RecordingStrategy()
    make_trainer([PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path / "clean")], strategy=strategy).fit(
        TinyModel()
    )
    assert strategy.outcomes() == [(None, 0)]
