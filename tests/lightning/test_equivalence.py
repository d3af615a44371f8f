"""The same batches through the Trainer callback, a Fabric loop and a plain PyTorch loop give bit-identical
kappa, rho-hat, effective learning rate per step and EMA tensors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import TinyModel, make_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import EMAScalingCallback, ScaledEMA

ACCUMULATE, EPOCHS = 2, 2
N_SAMPLES, MICRO_BATCH = 18, 4  # micro-batches 4, 4, 4, 4, 2: steps of 8, 8 and a short 2 per epoch
OPTIONS = dict(
    momentum=0.9,
    final_momentum=0.99,
    momentum_schedule="cosine",
    base_batch_size=4,
    update_every=2,
    warmup=True,
    total_samples=EPOCHS * N_SAMPLES,
)


def loss_of(model: TinyModel, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def new_model(optimizer: str) -> TinyModel:
    L.seed_everything(0)
    return TinyModel(n_samples=N_SAMPLES, batch_size=MICRO_BATCH, optimizer=optimizer, lr=0.05)


def loader(model: TinyModel) -> DataLoader:
    return DataLoader(TensorDataset(model.x, model.y), batch_size=MICRO_BATCH)


def record(ema: ScaledEMA, rows: list) -> None:
    rows.append((ema.kappa, ema.ema_momentum, ema.step_lrs[0][0], ema.samples_seen))


def run_trainer(optimizer: str, rule: str):
    model = new_model(optimizer)
    callback = EMAScalingCallback(optimizer_rule=rule, **OPTIONS)
    rows: list = []

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.step = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step > self.step:
                record(callback.scaled_ema, rows)

    make_trainer([callback, Recorder()], max_epochs=EPOCHS, accumulate_grad_batches=ACCUMULATE).fit(model)
    return rows, callback.ema_state_dict()


def run_fabric(optimizer: str, rule: str):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = new_model(optimizer)
    optimizer_ = model.configure_optimizers()
    wrapped_model, wrapped_optimizer = fabric.setup(model, optimizer_)
    data = fabric.setup_dataloaders(loader(model))
    ema = ScaledEMA(wrapped_model, wrapped_optimizer, optimizer_rule=rule, **OPTIONS)  # Fabric's wrappers unwrapped
    rows: list = []
    for _ in range(EPOCHS):
        for index, batch in enumerate(data):
            last = index + 1 == len(data)
            stepping = (index + 1) % ACCUMULATE == 0 or last
            with fabric.no_backward_sync(wrapped_model, enabled=not stepping):
                fabric.backward(loss_of(wrapped_model, batch) / ACCUMULATE)
            ema.count_samples(len(batch[0]) * fabric.world_size)
            if stepping:
                wrapped_optimizer.step()
                wrapped_optimizer.zero_grad()
                record(ema, rows)
    return rows, ema.ema_state_dict()


def run_plain(optimizer: str, rule: str):
    model = new_model(optimizer)
    optimizer_ = model.configure_optimizers()
    data = loader(model)
    ema = ScaledEMA(model, optimizer_, optimizer_rule=rule, **OPTIONS)
    rows: list = []
    for _ in range(EPOCHS):
        for index, batch in enumerate(data):
            (loss_of(model, batch) / ACCUMULATE).backward()
            ema.count_samples(len(batch[0]))
            if (index + 1) % ACCUMULATE == 0 or index + 1 == len(data):
                optimizer_.step()
                optimizer_.zero_grad()
                record(ema, rows)
    return rows, ema.ema_state_dict()


@pytest.mark.parametrize(("optimizer", "rule"), [("sgd", "sgd"), ("adam", "adam")])
def test_trainer_fabric_and_a_plain_loop_agree_bit_for_bit(optimizer, rule):
    trainer_rows, trainer_ema = run_trainer(optimizer, rule)
    fabric_rows, fabric_ema = run_fabric(optimizer, rule)
    plain_rows, plain_ema = run_plain(optimizer, rule)
    # 3 steps per epoch: global batches 8, 8, 2 against base 4
    assert [kappa for kappa, _, _, _ in plain_rows] == [2.0, 2.0, 0.5] * EPOCHS
    assert plain_rows[-1][3] == EPOCHS * N_SAMPLES
    assert len({rho for _, rho, _, _ in plain_rows}) == 6  # warm-up and the cosine move rho-hat every step
    assert trainer_rows == fabric_rows == plain_rows
    assert trainer_ema.keys() == fabric_ema.keys() == plain_ema.keys()
    for name, value in plain_ema.items():
        assert torch.equal(trainer_ema[name], value), name
        assert torch.equal(fabric_ema[name], value), name


def test_fabric_save_and_load_resume_the_ema_exactly(tmp_path):
    def build():
        fabric = L.Fabric(accelerator="cpu", devices=1)
        model = new_model("sgd")
        wrapped, optimizer = fabric.setup(model, model.configure_optimizers())
        ema = ScaledEMA(model, optimizer, optimizer_rule="sgd", **{**OPTIONS, "update_every": 3})
        return fabric, model, wrapped, optimizer, ema

    def train(fabric, wrapped, optimizer, ema, batches):
        for batch in batches:
            fabric.backward(loss_of(wrapped, batch))
            ema.count_samples(len(batch[0]))
            optimizer.step()
            optimizer.zero_grad()

    batches = list(loader(new_model("sgd")))  # 5 steps: 4, 4, 4, 4, 2 samples
    fabric, _, wrapped, optimizer, full = build()
    train(fabric, wrapped, optimizer, full, batches)
    fabric, _, wrapped, optimizer, half = build()
    train(fabric, wrapped, optimizer, half, batches[:2])
    fabric.save(tmp_path / "run.ckpt", {"model": wrapped, "optimizer": optimizer, "ema": half})  # mid-window
    fabric, _, wrapped, optimizer, resumed = build()
    fabric.load(tmp_path / "run.ckpt", {"model": wrapped, "optimizer": optimizer, "ema": resumed})
    assert (resumed.samples_seen, resumed.optimizer_steps) == (8, 2)
    train(fabric, wrapped, optimizer, resumed, batches[2:])
    assert (resumed.samples_seen, resumed.optimizer_steps, resumed.ema_updates) == (18, 5, 1)
    for name, value in full.ema_state_dict().items():
        assert torch.equal(resumed.ema_state_dict()[name], value), name
