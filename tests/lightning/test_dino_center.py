"""DINO's teacher-output centre under gradient accumulation: `center_momenta` makes 4 accumulated micro-batches of 8
move it exactly as one batch of 32 does (one centre per step, one update with the step's mean)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import DINO_PAIRS, TinyDINO, make_trainer

from lightning_emascale import EMAScalingCallback
from lightning_emascale._centers import CenterUpdate

PAIRS = DINO_PAIRS


class HandWiredCenter(L.Callback):
    """The protocol wired by hand, as the core is expected to: resolve + attach at fit start, ``micro_batch`` with
    every micro-batch's global size, ``end_step`` with the step's kappa once the optimizer stepped, restore at the
    end of fit."""

    def __init__(self, path: str, momentum: float, base_batch_size: int) -> None:
        self.path, self.momentum, self.base = path, momentum, base_batch_size

    def on_fit_start(self, trainer, pl_module):
        self.update = CenterUpdate.resolve(pl_module, self.path, self.momentum)
        self.update.attach()
        self.samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step
        size = len(batch[0]) * trainer.world_size
        self.samples += size
        self.update.micro_batch(size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.step:
            self.update.end_step(self.samples / self.base)
            self.samples = 0

    def on_fit_end(self, trainer, pl_module):
        self.update.restore()


#: Validation (a sanity check and one pass per epoch) computing the loss, which moves the centre in both runs.
VALIDATE = {"limit_val_batches": 1.0, "num_sanity_val_steps": 1}
RUNS = pytest.mark.parametrize("validate", [False, True], ids=["train-only", "with-validation"])


def fit(batch_size: int, accumulate: int, *callbacks: L.Callback, validate=False, **ema_kwargs) -> TinyDINO:
    L.seed_everything(0)
    model = TinyDINO(n_samples=64, batch_size=batch_size)
    ema = EMAScalingCallback(momentum=0.99, base_batch_size=32, teachers=PAIRS, **ema_kwargs)
    trainer = make_trainer(
        [ema, *callbacks], max_epochs=2, accumulate_grad_batches=accumulate, **(VALIDATE if validate else {})
    )
    trainer.fit(model)
    return model


_REFERENCES: dict[bool, TinyDINO] = {}


def reference(validate: bool) -> TinyDINO:
    """The large-batch run: 4 steps of one batch of 32, the plain DINOLoss moving its centre at 0.9 per step."""
    if validate not in _REFERENCES:
        _REFERENCES[validate] = fit(32, 1, validate=validate)
    return _REFERENCES[validate]


def assert_same_run(model: TinyDINO, reference: TinyDINO) -> None:
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


@RUNS
def test_center_momenta_under_accumulation_equals_one_big_batch(validate):
    expected = reference(validate)
    model = fit(8, 4, validate=validate, center_momenta={"criterion": 0.9})
    assert not torch.equal(expected.criterion.center, torch.zeros_like(expected.criterion.center))
    torch.testing.assert_close(model.criterion.center, expected.criterion.center, rtol=1e-5, atol=1e-6)
    assert_same_run(model, expected)
    assert "update_center" not in vars(model.criterion) and model.criterion.center_momentum == 0.9  # restored


@RUNS
def test_the_protocol_wired_by_hand_equals_one_big_batch(validate):
    expected = reference(validate)
    model = fit(8, 4, HandWiredCenter("criterion", 0.9, base_batch_size=32), validate=validate)
    torch.testing.assert_close(model.criterion.center, expected.criterion.center, rtol=1e-5, atol=1e-6)
    assert_same_run(model, expected)
    assert "update_center" not in vars(model.criterion) and model.criterion.center_momentum == 0.9


@pytest.mark.parametrize(
    "ema_kwargs", [{}, {"momentum_attributes": {"criterion.center_momentum": 0.9}}], ids=["plain", "per-micro-batch"]
)
def test_without_center_momenta_accumulation_misses_the_big_batch_centre(ema_kwargs):
    """What the tests above catch: the plain loss, even with its momentum scaled per micro-batch, drifts."""
    model = fit(8, 4, **ema_kwargs)
    assert (model.criterion.center - reference(False).criterion.center).abs().max() > 1e-4  # 100 x the tolerance
