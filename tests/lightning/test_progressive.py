"""ProgressiveBatchCallback with EMAScalingCallback: Algorithm 1 end to end, the sample clock, resume, errors."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from helpers import TinyModel, make_trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import EMAScalingCallback, ProgressiveBatchCallback

N, BASE, EPOCHS = 32, 2, 6
SCHEDULE = {0: BASE, 2: 2 * BASE, 4: 8 * BASE}  # the issue's {0: B, 2: 2B, 4: 8B}
RHO, RHO_FINAL, ETA = 0.9, 0.99, 0.02


class StepLog(L.Callback):
    """Per optimizer step: kappa, rho-hat, samples before the step, the LR the step used, the EMA after it."""

    def __init__(self, ema: EMAScalingCallback) -> None:
        self.ema = ema
        self.rows: list[dict] = []
        self._lr = math.nan
        self._samples_before = 0
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        if not self.rows or self.rows[-1]["done"]:
            self._samples_before = self.ema.samples_seen

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._lr = optimizer.param_groups[0]["lr"]  # inside the step: scaled by the optimizer rule

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._step:
            return
        self.rows.append(
            {
                "done": True,
                "epoch": trainer.current_epoch,
                "samples_before": self._samples_before,
                "samples_seen": self.ema.samples_seen,
                "kappa": self.ema.kappa,
                "momentum": self.ema.ema_momentum,
                "lr": self._lr,
                "accumulate": trainer.accumulate_grad_batches,
                "ema": {k: v.detach().clone() for k, v in self.ema.ema_state_dict().items()},
                "raw": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            }
        )
        self._samples_before = self.ema.samples_seen


def progressive_run(
    tmp_path=None, ckpt_path=None, checkpoint_every=None, model=None, schedule=SCHEDULE, mode="batch_size", **kw
):
    L.seed_everything(0)
    model = model or TinyModel(n_samples=N, batch_size=BASE, lr=ETA, scheduler="sample_clock", loader="stateful")
    ema = EMAScalingCallback(
        momentum=RHO,
        base_batch_size=BASE,
        optimizer_rule="sgd",
        momentum_schedule="cosine",
        final_momentum=RHO_FINAL,
    )
    log = StepLog(ema)
    callbacks = [ProgressiveBatchCallback(schedule, mode=mode), ema, log]
    extra = {}
    if checkpoint_every:
        callbacks.append(
            ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=checkpoint_every, save_top_k=-1, filename="{step}")
        )
        extra["enable_checkpointing"] = True
    trainer = make_trainer(callbacks, max_epochs=EPOCHS, **{**extra, **kw})
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model, ema, log


def algorithm1_reference(model: TinyModel, schedule: dict[int, int], epochs: int) -> list[dict]:
    """Algorithm 1 of the paper written out without Lightning: every schedule a function of samples seen."""
    net = copy.deepcopy(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=ETA, momentum=0.9)
    ema = {k: v.detach().double().clone() for k, v in net.state_dict().items()}
    total = epochs * N
    s, rows = 0, []
    for epoch in range(epochs):
        batch = [size for start, size in sorted(schedule.items()) if start <= epoch][-1]
        for start in range(0, N, batch):
            x, y = net.x[start : start + batch], net.y[start : start + batch]
            kappa = len(x) / BASE
            p = s / total
            # LR factor: linear warm-up over 20% of the samples, then a cosine from 1 to 0.1
            factor = p / 0.2 if p < 0.2 else 0.1 + 0.9 * (1 + math.cos(math.pi * (p - 0.2) / 0.8)) / 2
            rho = RHO_FINAL - (RHO_FINAL - RHO) * (1 + math.cos(math.pi * p)) / 2
            lr_hat, rho_hat = kappa * (ETA * factor), rho**kappa
            for group in optimizer.param_groups:
                group["lr"] = lr_hat
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
            for k, v in net.state_dict().items():
                ema[k] = rho_hat * ema[k] + (1 - rho_hat) * v.double() if v.is_floating_point() else v.double()
            rows.append({"samples_before": s, "kappa": kappa, "momentum": rho_hat, "lr": lr_hat, "ema": dict(ema)})
            s += len(x)
    return rows


def test_algorithm1_every_step_matches_an_independent_reference():
    L.seed_everything(0)
    model = TinyModel(n_samples=N, batch_size=BASE, lr=ETA, scheduler="sample_clock")
    reference = algorithm1_reference(model, SCHEDULE, EPOCHS)
    _, _, ema, log = progressive_run(model=model)

    assert len(log.rows) == len(reference) == 16 + 16 + 8 + 8 + 2 + 2
    assert [row["kappa"] for row in log.rows] == [1.0] * 32 + [2.0] * 16 + [8.0] * 4
    for step, (ours, ref) in enumerate(zip(log.rows, reference)):
        assert ours["samples_before"] == ref["samples_before"], step
        assert ours["kappa"] == ref["kappa"], step
        assert ours["momentum"] == pytest.approx(ref["momentum"], rel=1e-12), step
        assert ours["lr"] == pytest.approx(ref["lr"], rel=1e-12), step
        for name, value in ref["ema"].items():
            torch.testing.assert_close(ours["ema"][name].double(), value, rtol=1e-5, atol=1e-6, msg=f"{step} {name}")
    assert ema.samples_seen == ema.resolved_total_samples == EPOCHS * N
    assert ema.progress == 1.0
    assert model.hparams.batch_size == 8 * BASE  # found in hparams, the way BatchSizeFinder finds it


def test_momentum_and_lr_against_samples_match_a_fixed_batch_run_up_to_kappa():
    _, _, _, fixed = progressive_run(schedule={0: BASE})
    _, _, _, grown = progressive_run(schedule={0: BASE, 1: 4 * BASE, 3: 8 * BASE})
    at_samples = {row["samples_before"]: row for row in fixed.rows}
    assert len(grown.rows) < len(fixed.rows)
    for row in grown.rows:
        base = at_samples[row["samples_before"]]  # the fixed run passes every sample count the grown one does
        assert base["kappa"] == 1.0
        assert row["momentum"] ** (1 / row["kappa"]) == pytest.approx(base["momentum"], rel=1e-12)
        assert row["lr"] / row["kappa"] == pytest.approx(base["lr"], rel=1e-12)
    # both schedules end at the same sample count: the end of training
    assert fixed.rows[-1]["samples_seen"] == grown.rows[-1]["samples_seen"] == EPOCHS * N


def test_accumulation_mode_grows_the_batch_without_touching_the_dataloader():
    L.seed_everything(0)
    model = TinyModel(n_samples=N, batch_size=BASE, lr=ETA, scheduler="sample_clock")
    initial = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    reference = algorithm1_reference(model, SCHEDULE, EPOCHS)
    _, model, _, log = progressive_run(model=model, mode="accumulation")
    assert model.hparams.batch_size == BASE
    assert [row["accumulate"] for row in log.rows] == [1] * 32 + [2] * 16 + [8] * 4
    for ours, ref in zip(log.rows, reference):
        assert (ours["samples_before"], ours["kappa"]) == (ref["samples_before"], ref["kappa"])
        assert ours["momentum"] == pytest.approx(ref["momentum"], rel=1e-12)
        assert ours["lr"] == pytest.approx(ref["lr"], rel=1e-12)
    # BatchNorm sees micro-batches of 2, so the weights differ from one batch of 4; the EMA of the weights
    # the run actually took must still follow rho-hat exactly
    ema = initial
    for row in log.rows:
        rho = row["momentum"]
        ema = {
            k: rho * ema[k] + (1 - rho) * v.double() if v.is_floating_point() else v.double()
            for k, v in row["raw"].items()
        }
        for name, value in ema.items():
            torch.testing.assert_close(row["ema"][name].double(), value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("resume_step", "where"),
    [(20, "mid-epoch 2, after the 2 -> 4 transition"), (32, "last batch of epoch 3, before the 4 -> 16 transition")],
)
def test_resume_is_bit_identical(tmp_path, resume_step, where):
    _, full_model, full_ema, full_log = progressive_run(tmp_path, checkpoint_every=4)
    ckpt = tmp_path / f"step={resume_step}.ckpt"
    assert ckpt.exists(), sorted(p.name for p in tmp_path.iterdir())

    _, model, ema, log = progressive_run(ckpt_path=str(ckpt))
    assert [row["epoch"] for row in log.rows][:1] == [full_log.rows[resume_step]["epoch"]], where
    assert ema.samples_seen == full_ema.samples_seen
    assert ema.optimizer_steps == full_ema.optimizer_steps
    assert model.hparams.batch_size == full_model.hparams.batch_size
    resumed_rows = full_log.rows[resume_step:]
    assert len(log.rows) == len(resumed_rows)
    for ours, theirs in zip(log.rows, resumed_rows):
        assert (ours["samples_before"], ours["kappa"], ours["momentum"], ours["lr"]) == (
            theirs["samples_before"],
            theirs["kappa"],
            theirs["momentum"],
            theirs["lr"],
        )
    for name, value in full_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    for name, value in full_ema.ema_state_dict().items():
        assert torch.equal(ema.ema_state_dict()[name], value), name


def test_resume_in_accumulation_mode_restores_the_accumulation(tmp_path):
    progressive_run(tmp_path, checkpoint_every=4, mode="accumulation")
    trainer, _, _, log = progressive_run(ckpt_path=str(tmp_path / "step=36.ckpt"), mode="accumulation")
    assert [row["accumulate"] for row in log.rows] == [2] * 12 + [8] * 4
    assert trainer.accumulate_grad_batches == 8


class MetricsLogger(L.pytorch.loggers.Logger):
    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    name, version = "capture", 0

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_transitions_are_logged_and_shown_in_the_progress_bar(caplog):
    logger = MetricsLogger()
    with caplog.at_level("INFO"):
        trainer, *_ = progressive_run(logger=logger)
    announced = [(step, m["progressive/batch_size"]) for step, m in logger.logged if "progressive/batch_size" in m]
    # one entry at each transition (epochs 0, 2, 4) at the step it takes effect, besides the per-step logs
    transitions = [(step, value) for step, value in announced if step in (0, 32, 48)]
    assert (0, 2.0) in transitions and (32, 4.0) in transitions and (48, 16.0) in transitions
    assert (
        "epoch 2 trains with 4 per device x 1 accumulated x 1 devices = 4 samples per optimizer step (was 2 x 1),"
        " kappa 2 for 'ema'" in caplog.text
    )
    assert "= 16 samples per optimizer step (was 4 x 1), kappa 8 for 'ema'" in caplog.text
    assert trainer.progress_bar_metrics["progressive/batch_size"] == 16.0
    assert trainer.progress_bar_metrics["ema/kappa"] == 8.0
    kappas = [m["ema/kappa"] for step, m in logger.logged if "ema/kappa" in m]
    assert sorted(set(kappas)) == [1.0, 2.0, 8.0]


def test_the_users_schedule_is_never_mutated():
    schedule = {4: 16, 0: 2}
    callback = ProgressiveBatchCallback(schedule)
    callback.schedule[9] = 99
    assert schedule == {4: 16, 0: 2}


def test_epochs_before_the_first_key_keep_the_configured_batch_size():
    L.seed_everything(0)
    model = TinyModel(n_samples=N, batch_size=4)
    ema = EMAScalingCallback(momentum=RHO)
    log = StepLog(ema)
    make_trainer([ProgressiveBatchCallback({2: 8}), ema, log], max_epochs=3).fit(model)
    assert [row["kappa"] for row in log.rows] == [1.0] * 16 + [2.0] * 4


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": {}}, r"`schedule` must be a non-empty dict of epoch -> batch size, got \{\}"),
        ({"schedule": [(0, 4)]}, r"`schedule` must be a non-empty dict"),
        ({"schedule": {-1: 4}}, r"`schedule` keys must be epochs \(integers >= 0\), got -1"),
        ({"schedule": {1.5: 4}}, r"`schedule` keys must be epochs \(integers >= 0\), got 1.5"),
        ({"schedule": {True: 4}}, r"`schedule` keys must be epochs \(integers >= 0\), got True"),
        ({"schedule": {0: 0}}, r"`schedule` values must be batch sizes \(integers >= 1\), got 0 at epoch 0"),
        ({"schedule": {0: 4, 2: 8.0}}, r"`schedule` values must be batch sizes \(integers >= 1\), got 8.0 at epoch 2"),
        ({"schedule": {0: 4}, "mode": "steps"}, r"`mode` must be one of \['accumulation', 'batch_size'\], got 'steps'"),
        ({"schedule": {0: 4}, "batch_arg_name": ""}, r"`batch_arg_name` must be a non-empty string, got ''"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProgressiveBatchCallback(**kwargs)


def fit_with(callbacks, model=None, train_dataloaders=None, **kwargs):
    model = model or TinyModel(n_samples=N, batch_size=4)
    make_trainer(callbacks, max_epochs=2, **kwargs).fit(model, train_dataloaders=train_dataloaders)


def test_a_dataloader_passed_to_fit_needs_accumulation_mode():
    loader = DataLoader(TensorDataset(torch.randn(8, 6), torch.randn(8, 1)), batch_size=4)
    with pytest.raises(
        ValueError, match=r"passed straight to `trainer.fit\(train_dataloaders=...\)`.*mode='accumulation'"
    ):
        fit_with([ProgressiveBatchCallback({1: 8})], train_dataloaders=loader)
    # accumulation mode keeps the loader, so it works
    ema = EMAScalingCallback(momentum=RHO)
    log = StepLog(ema)
    fit_with([ProgressiveBatchCallback({1: 8}, mode="accumulation"), ema, log], train_dataloaders=loader)
    assert [row["kappa"] for row in log.rows] == [1.0, 1.0, 2.0]


def test_a_missing_attribute_names_the_argument():
    with pytest.raises(AttributeError, match=r"`batch_arg_name`='bs' was not found on the LightningModule"):
        fit_with([ProgressiveBatchCallback({1: 8}, batch_arg_name="bs")])


class IgnoresBatchSize(TinyModel):
    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=4)


def test_a_dataloader_that_ignores_the_attribute_is_caught():
    with pytest.raises(RuntimeError, match=r"set `batch_size`=8 for epoch 1, but the train dataloader was built with"):
        fit_with([ProgressiveBatchCallback({1: 8})], model=IgnoresBatchSize(n_samples=N, batch_size=4))


class TwoStreams(TinyModel):
    """A labelled loader at a quarter of the batch beside the main one, as in pseudo-labelling."""

    follows = True

    def train_dataloader(self):
        from lightning.pytorch.utilities import CombinedLoader

        data = TensorDataset(self.x, self.y)
        main = self.hparams.batch_size if self.follows else 4
        loaders = {"labeled": DataLoader(data, batch_size=max(1, main // 4)), "main": DataLoader(data, batch_size=main)}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def training_step(self, batch, batch_idx):
        return super().training_step(batch["main"], batch_idx)


def test_a_combined_loader_needs_one_loader_to_follow_the_attribute():
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, len(batch["main"][0]), len(batch["labeled"][0])))

    fit_with([ProgressiveBatchCallback({1: 8}), Record()], model=TwoStreams(n_samples=N, batch_size=4))
    assert {entry for entry in seen if entry[0] == 1} == {(1, 8, 2)}  # both rebuilt: 8 and 8 // 4
    model = TwoStreams(n_samples=N, batch_size=4)
    model.follows = False
    with pytest.raises(RuntimeError, match=r"built with batch_size=\[1, 4\] \(one per loader; none follows it\)"):
        fit_with([ProgressiveBatchCallback({1: 8})], model=model)


def test_accumulation_mode_errors():
    with pytest.raises(ValueError, match=r"got `Trainer\(accumulate_grad_batches=2\)`: remove that argument"):
        fit_with([ProgressiveBatchCallback({1: 8}, mode="accumulation")], accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="remove the GradientAccumulationScheduler"):
        fit_with(
            [ProgressiveBatchCallback({1: 8}, mode="accumulation"), GradientAccumulationScheduler({1: 2})],
        )
    with pytest.raises(ValueError, match=r"the batch size 6 of epoch 1 is not a multiple of the dataloader's per"):
        fit_with([ProgressiveBatchCallback({1: 6}, mode="accumulation")])


class Manual(TinyModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()


def test_accumulation_mode_rejects_manual_optimization():
    with pytest.raises(RuntimeError, match="which manual optimization ignores"):
        fit_with([ProgressiveBatchCallback({1: 8}, mode="accumulation")], model=Manual(n_samples=N, batch_size=4))


def test_only_one_instance():
    with pytest.raises(RuntimeError, match="Found more than one stateful callback of type `ProgressiveBatchCallback`"):
        fit_with([ProgressiveBatchCallback({1: 8}), ProgressiveBatchCallback({1: 8}, mode="accumulation")])


def test_a_checkpoint_of_another_format_is_refused():
    with pytest.raises(ValueError, match="state has format 7; this version of lightning-emascale reads format 1"):
        ProgressiveBatchCallback({0: 4}).load_state_dict({"format": 7})


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        ({"format": 1}, KeyError, r"lacks \['epoch', 'initial'\]"),
        ({"format": 1, "epoch": "x", "initial": 4}, ValueError, r"has epoch='x'; None or an integer >= 0"),
        ({"format": 1, "epoch": 3, "initial": -3}, ValueError, r"has initial=-3; None or an integer >= 1"),
        (
            {"format": 1, "epoch": 10**400, "initial": 4},
            ValueError,
            r"has epoch=1e\+400 .* and at most 9007199254740992",
        ),
        (None, TypeError, r"must be a dict, got NoneType"),
    ],
)
def test_a_bad_saved_state_is_refused_before_anything_changes(state, error, match):
    callback = ProgressiveBatchCallback({0: 2, 1: 4})
    callback.load_state_dict({"format": 1, "epoch": 1, "initial": 2})
    with pytest.raises(error, match=match):
        callback.load_state_dict(state)
    assert callback.state_dict() == {"format": 1, "epoch": 1, "initial": 2}
