"""Records kappa, rho-hat and the LR of every optimizer step, and plots them against samples seen."""

from __future__ import annotations

import lightning as L

from lightning_emascale import EMAScalingCallback


def parse_schedule(text: str) -> dict[int, int]:
    """``"0:32,2:64"`` -> ``{0: 32, 2: 64}`` (epoch -> per-device batch size), for the examples' ``--schedule``."""
    return {int(epoch): int(size) for epoch, size in (item.split(":") for item in text.split(","))}


class Trace(L.Callback):
    """Per optimizer step: samples seen before it, global batch, kappa, rho-hat, the LR the step used, epoch."""

    def __init__(self, ema: EMAScalingCallback) -> None:
        self.ema = ema
        self.rows: list[tuple[int, int, float, float, float, int]] = []
        self._before, self._lr, self._step = 0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._lr = optimizer.param_groups[0]["lr"]  # inside the step: already scaled by kappa

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._step:
            batch = self.ema.samples_seen - self._before
            row = (self._before, batch, self.ema.kappa, self.ema.ema_momentum, self._lr, trainer.current_epoch)
            self.rows.append(row)
            self._before = self.ema.samples_seen

    def print_epochs(self) -> None:
        print("first step of each epoch (rho-hat^(1/kappa) and LR/kappa are the base-batch schedules at that sample):")
        header = ("epoch", "samples seen", "global batch", "kappa", "rho-hat", "rho-hat^(1/kappa)", "LR", "LR/kappa")
        print("{:>5} {:>12} {:>12} {:>6} {:>9} {:>17} {:>8} {:>8}".format(*header))
        epoch = -1
        for samples, batch, kappa, momentum, lr, row_epoch in self.rows:
            if row_epoch != epoch:
                epoch = row_epoch
                unscaled = momentum ** (1 / kappa)
                print(
                    f"{epoch:>5} {samples:>12} {batch:>12} {kappa:>6g} {momentum:>9.6f} {unscaled:>17.6f}"
                    f" {lr:>8.5f} {lr / kappa:>8.5f}"
                )

    def plot(self, path: str, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(4, 1, figsize=(7, 9), sharex=True)
        self.draw(axes)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    def draw(self, axes) -> None:
        """The four panels against samples seen: global batch, kappa, rho-hat, the LR, on four axes."""
        rows = self.rows
        samples = [row[0] for row in rows]  # the short last batch of each epoch shows as a dip
        for axis, column, label in zip(
            axes, (1, 2, 3, 4), ("global batch", "kappa", "EMA momentum rho-hat", "learning rate (scaled)")
        ):
            axis.step(samples, [row[column] for row in rows], where="post", label="used at the step")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
        # Undo the scaling: what is left is the base-batch schedule of samples seen, smooth across transitions
        axes[2].plot(samples, [row[3] ** (1 / row[2]) for row in rows], "--", label="rho-hat^(1/kappa)")
        axes[3].plot(samples, [row[4] / row[2] for row in rows], "--", label="LR / kappa")
        for axis in axes[2:]:
            axis.legend(loc="lower left", fontsize=8)
        axes[1].set_yscale("log", base=2)
        axes[-1].set_xlabel("samples seen")
