"""Records kappa, rho-hat and the LR of every optimizer step, and plots them against samples seen."""

from __future__ import annotations

import textwrap
from collections import Counter

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

    def short_steps(self) -> list[bool]:
        """Per row: whether the step took fewer samples than the largest step of its epoch.

        That is the epoch's last step when the training set is not a multiple of the global batch: its κ is its
        samples / the base batch, so its ρ̂ = ρ^κ is nearer 1 and its LR × κ smaller than the epoch's other steps.
        """
        full: dict[int, int] = {}
        for _, batch, *_, epoch in self.rows:
            full[epoch] = max(full.get(epoch, 0), batch)
        return [batch < full[epoch] for _, batch, *_, epoch in self.rows]

    def kappa_summary(self) -> str:
        """The κ of every step, grouped: ``kappa 1 on 1380 steps of 32 samples; kappa 0.40625 on 6 short ...``."""
        groups = Counter((short, row[1], row[2]) for row, short in zip(self.rows, self.short_steps()))
        parts = []
        for (short, batch, kappa), count in sorted(groups.items(), key=lambda item: item[0][0]):  # full steps first
            plural = "s" if count > 1 else ""
            steps = (
                f"short last step{plural} of an epoch ({batch} samples)"
                if short
                else f"step{plural} of {batch} samples"
            )
            parts.append(f"kappa {kappa:g} on {count} {steps}")
        return "; ".join(parts)

    def print_short_steps(self) -> None:
        """The epochs' short last steps, or a line saying there are none."""
        short = [row for row, is_short in zip(self.rows, self.short_steps()) if is_short]
        if not short:
            print("no short steps: every epoch's training set is a multiple of its global batch")
            return
        print(
            "short last step of each epoch (its training set is not a multiple of the global batch): kappa = its"
            " samples / the base batch is smaller, so rho-hat = rho^kappa is nearer 1 and LR x kappa smaller;"
            " the circles in the figure"
        )
        header = ("epoch", "samples seen", "global batch", "kappa", "rho-hat", "LR")
        print("{:>5} {:>12} {:>12} {:>6} {:>9} {:>8}".format(*header))
        for samples, batch, kappa, momentum, lr, epoch in short:
            print(f"{epoch:>5} {samples:>12} {batch:>12} {kappa:>6g} {momentum:>9.6f} {lr:>8.5f}")

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

        fig, axes = plt.subplots(4, 1, figsize=(7, 9.6), sharex=True)
        self.draw(axes)
        fig.suptitle(title)
        short = [row for row, is_short in zip(self.rows, self.short_steps()) if is_short]
        if short:
            sizes = " or ".join(str(size) for size in sorted({row[1] for row in short}))
            epochs: dict[int, int] = {}  # epoch -> training samples in it
            for _, batch, *_, epoch in self.rows:
                epochs[epoch] = epochs.get(epoch, 0) + batch
            per_epoch = " or ".join(str(size) for size in sorted(set(epochs.values())))
            caption = (
                f"Circles: each epoch's last step is short ({sizes} samples), as the {per_epoch} training samples of an"
                " epoch are not a multiple of the batch. Its kappa = samples / base batch is smaller, so rho-hat ="
                " rho^kappa is nearer 1 and the LR x kappa smaller: the rule at work, not a glitch. The dashed"
                " base-batch schedules run through them."
            )
            fig.text(0.01, 0.005, textwrap.fill(caption, 105), fontsize=8, va="bottom")
            fig.tight_layout(rect=(0, 0.06, 1, 1))
        else:
            fig.tight_layout()
        fig.savefig(path, dpi=120)

    def draw(self, axes) -> None:
        """The four panels against samples seen: global batch, kappa, rho-hat, the LR, on four axes.

        The line is the full steps; an epoch's short last step (``short_steps``) is a separate mark, so that its
        smaller κ does not read as a spike of the schedule.
        """
        short = self.short_steps()
        full = [row for row, is_short in zip(self.rows, short) if not is_short]
        cut = [row for row, is_short in zip(self.rows, short) if is_short]
        samples = [row[0] for row in full]
        for axis, column, label in zip(
            axes, (1, 2, 3, 4), ("global batch", "kappa", "EMA momentum rho-hat", "learning rate (scaled)")
        ):
            axis.step(samples, [row[column] for row in full], where="post", label="used at the step")
            if cut:
                axis.plot(
                    [row[0] for row in cut], [row[column] for row in cut], "o", color="C3", markersize=4,
                    markerfacecolor="none", label="an epoch's short last step",
                )  # fmt: skip
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
        # Undo the scaling: what is left is the base-batch schedule of samples seen, smooth across transitions
        every = [row[0] for row in self.rows]
        axes[2].plot(every, [row[3] ** (1 / row[2]) for row in self.rows], "--", label="rho-hat^(1/kappa)")
        axes[3].plot(every, [row[4] / row[2] for row in self.rows], "--", label="LR / kappa")
        if cut:
            axes[0].legend(loc="upper left", fontsize=8)
        for axis in axes[2:]:
            axis.legend(loc="lower left", fontsize=8)
        axes[1].set_yscale("log", base=2)
        axes[-1].set_xlabel("samples seen")
