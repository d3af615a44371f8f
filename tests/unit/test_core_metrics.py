"""What `ScaledEMA.metrics()` and its properties report: the EMA's half-life in samples, which does not
depend on the batch size (NaN before the first step), and the scaled learning rates under the keys of
Lightning's LearningRateMonitor, for several optimizers and named param groups. No Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import Annealed, step

from lightning_emascale import ScaledEMA


def test_the_half_life_in_samples_does_not_depend_on_the_batch_size():
    half_lives = []
    for batch in (4, 16):
        model = Annealed()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ema = ScaledEMA(model, optimizer, momentum=0.999, base_batch_size=4)
        assert math.isnan(ema.half_life)
        step(ema, model, optimizer, size=batch)
        half_lives.append(ema.half_life)
    assert half_lives[0] == pytest.approx(half_lives[1]) == pytest.approx(4 * math.log(0.5) / math.log(0.999))
    model = Annealed()
    ema = ScaledEMA(model, None, momentum=0.99, momentum_schedule="cosine", final_momentum=1.0, total_samples=4)
    ema.count_samples(4)
    ema.end_step()
    assert ema.half_life == pytest.approx(4 * math.log(0.5) / math.log(0.99))


def test_lr_keys_follow_lightnings_learning_rate_monitor():
    model = Annealed()
    groups = [{"params": model.generator.parameters()}, {"params": model.discriminator.parameters(), "lr": 0.01}]
    first = torch.optim.SGD(groups, lr=0.1)
    second = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "name": "extra"}], lr=1.0)
    ema = ScaledEMA(model, [first, second], momentum=0.9, base_batch_size=4, optimizer_rule="sgd", auto_end_step=False)
    model(torch.randn(8, 3)).sum().backward()
    ema.count_samples(8)
    first.step()
    second.step()
    ema.end_step()
    lrs = {key: value for key, value in ema.metrics().items() if "/lr-" in key}
    assert lrs == pytest.approx({"ema/lr-SGD/pg1": 0.2, "ema/lr-SGD/pg2": 0.02, "ema/lr-SGD-1/extra": 2.0})


def test_with_update_every_the_momentum_an_update_applies_is_logged_beside_the_per_step_one():
    model = Annealed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.99, base_batch_size=4, update_every=4)
    assert math.isnan(ema.momentum_per_update)
    start = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    for _ in range(4):
        step(ema, model, optimizer)
    metrics = ema.metrics()
    assert metrics["ema/momentum"] == pytest.approx(0.99)  # per step
    assert metrics["ema/momentum_per_update"] == pytest.approx(0.99**4) == ema.momentum_per_update
    weight = "discriminator.weight"  # and it is what the update applied
    expected = 0.99**4 * start[weight] + (1 - 0.99**4) * model.state_dict()[weight]
    torch.testing.assert_close(ema.ema_state_dict()[weight], expected, rtol=0, atol=1e-7)
    plain = ScaledEMA(Annealed(), None, momentum=0.99)
    assert "ema/momentum_per_update" not in plain.metrics()  # update_every=1: the same as ema/momentum
