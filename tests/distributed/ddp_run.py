"""Run by test_ddp.py in a subprocess: a 2-process CPU (gloo) ddp_spawn fit, results written as a torch file."""

import sys

import lightning as L
import torch
from helpers import StepRecorder, TinyModel, make_trainer, reference_ema

from lightning_emascale import EMAScalingCallback


class RankCheck(L.Callback):
    """Asserts the invariants on every rank, inside the hooks; a failed assert fails the whole run."""

    def __init__(self, ema, recorder, initial):
        self.ema, self.recorder, self.initial = ema, recorder, initial

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert trainer.world_size == 2
        # per-device micro-batch 3, 2 micro-batches per step, 2 devices: global 12 = 2 x base 6
        assert self.ema.kappa == 2.0 or self.ema.optimizer_steps == 0, self.ema.kappa
        assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1  # unscaled outside the step

    def on_train_end(self, trainer, pl_module):
        assert self.recorder.batch_sizes == [12, 12, 12, 12]
        expected = reference_ema(self.initial, self.recorder, 0.9, 6)
        for name, value in self.ema.ema_state_dict().items():
            torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6, msg=name)


def main(out_path: str) -> None:
    L.seed_everything(0)
    model = TinyModel(n_samples=24, batch_size=3)
    initial = {
        k: v.detach().clone() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
    }
    callback = EMAScalingCallback(momentum=0.9, base_batch_size=6, optimizer_rule="sgd")
    recorder = StepRecorder()
    trainer = make_trainer(
        [callback, recorder, RankCheck(callback, recorder, initial)],
        strategy="ddp_spawn",
        devices=2,
        accumulate_grad_batches=2,
        max_epochs=2,
    )
    trainer.fit(model)
    # ddp_spawn sends rank 0's weights and callback_metrics back to this process
    torch.save(
        {
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "initial": initial,
            "final": {k: v.detach().clone() for k, v in model.state_dict().items()},
        },
        out_path,
    )


if __name__ == "__main__":
    main(sys.argv[1])
