"""The callback's fast paths give the default's results: `flat_parameters=True` and `offload=True` give the
same EMA, raw weights, validation loss and checkpoints as the default in a fit, and the optimizer's pre-step hook
waits for the side stream only where Lightning does not call `on_before_optimizer_step` first (an overridden
`optimizer_step` that steps the raw optimizer)."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyModel, make_trainer

from lightning_emascale import EMAScalingCallback

# flat_parameters is deprecated (test_flat_parameters_is_deprecated_with_the_measurements): its tests silence that
pytestmark = pytest.mark.filterwarnings("ignore:`flat_parameters=True` is deprecated:FutureWarning")


def test_flat_parameters_in_a_fit_give_the_same_ema_and_checkpoints(tmp_path):
    results = []
    for flat in (False, True):
        torch.manual_seed(0)
        model = TinyModel()
        callback = EMAScalingCallback(momentum=0.9, optimizer_rule="sgd", flat_parameters=flat)
        trainer = make_trainer([callback], max_epochs=2, limit_val_batches=None)
        trainer.fit(model)
        loss = trainer.validate(model, verbose=False)[0]["val_loss"]
        trainer.save_checkpoint(tmp_path / f"{flat}.ckpt")
        results.append((callback.ema_state_dict(), dict(model.state_dict()), loss))
    (ema, raw, loss), (flat_ema, flat_raw, flat_loss) = results
    assert all(torch.equal(ema[name], flat_ema[name]) for name in ema)
    assert all(torch.equal(raw[name], flat_raw[name]) for name in raw)
    assert loss == flat_loss
    saved = torch.load(tmp_path / "True.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[name], ema[name].to(saved[name].dtype)) for name in ema if name in saved)


def test_an_offloaded_ema_in_a_fit_equals_the_default(tmp_path):
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = TinyModel()
        callback = EMAScalingCallback(momentum=0.9, optimizer_rule="sgd", offload=offload, update_every=2)
        trainer = make_trainer([callback], max_epochs=2, limit_val_batches=None)
        trainer.fit(model)
        loss = trainer.validate(model, verbose=False)[0]["val_loss"]
        trainer.save_checkpoint(tmp_path / f"{offload}.ckpt")
        saved = torch.load(tmp_path / f"{offload}.ckpt", weights_only=False)["state_dict"]
        results.append((callback.ema_state_dict(), saved, loss))
    (ema, saved, loss), (offloaded, offloaded_saved, offloaded_loss) = results
    assert all(torch.equal(ema[name], offloaded[name]) for name in ema)
    assert all(torch.equal(saved[name], offloaded_saved[name]) for name in saved)
    assert loss == offloaded_loss


def test_the_pre_step_hook_waits_for_the_side_stream_unless_lightning_calls_the_closure_first(tmp_path):
    """Automatic optimization waits in `on_before_optimizer_step`, after forward and backward; manual optimization
    or an overridden `optimizer_step` may step the raw optimizer, so there the pre-step hook waits."""

    class OwnStep(TinyModel):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer_closure()
            optimizer.optimizer.step()  # the raw optimizer: Lightning calls no `on_before_optimizer_step`

    for module_class, expected in ((TinyModel, False), (OwnStep, True)):
        callback = EMAScalingCallback(momentum=0.9)
        make_trainer([callback], max_epochs=1).fit(module_class())
        assert callback.ema_updates > 0
        assert callback.scaled_ema.wait_before_step is expected, module_class
