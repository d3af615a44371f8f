"""PostHocEMACallback in the Trainer: snapshots on the sample clock, reconstruction, exact resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import TinyModel, make_trainer

from lightning_emascale import PostHocEMACallback, ProgressiveBatchCallback, reconstruct_post_hoc


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
def test_a_post_hoc_directory_of_another_run_is_refused(tmp_path):
    make_trainer([PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)]).fit(TinyModel())
    with pytest.raises(ValueError, match=r"already holds 2 post-hoc snapshots of another run"):
        make_trainer([PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)]).fit(TinyModel())


def test_a_smoke_test_writes_no_post_hoc_snapshots(tmp_path):
    make_trainer([PostHocEMACallback(snapshot_every_samples=4, directory=tmp_path)], fast_dev_run=1).fit(TinyModel())
    assert not list(tmp_path.iterdir())
    make_trainer([PostHocEMACallback(snapshot_every_samples=16, directory=tmp_path)]).fit(TinyModel())  # not refused
    assert len(list(tmp_path.iterdir())) == 2
