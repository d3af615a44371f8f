"""What ScaledEMA averages: `include` and `exclude` choose submodules, parameters and buffers and leave the
rest of the model untouched by the average and by the swap; non-persistent buffers (an annealed temperature) are
left out unless named exactly, so a swap shows their current value. No Trainer."""

from __future__ import annotations

import torch
from helpers import Annealed, step

from lightning_emascale import ScaledEMA


def test_non_persistent_buffers_are_not_averaged_nor_swapped_unless_included():
    model = Annealed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.9)
    assert "temperature" not in ema.ema_state_dict()
    model.temperature.fill_(0.5)  # annealed during training
    step(ema, model, optimizer)
    with ema.swapped():
        assert model.temperature.item() == 0.5  # the current value, not an average of the schedule
    included = ScaledEMA(Annealed(), None, momentum=0.9, include=["generator", "discriminator", "temperature"])
    assert "temperature" in included.ema_state_dict()


def test_include_and_exclude_choose_submodules_and_leave_the_rest_untouched():
    model = Annealed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.5, exclude=["discriminator"])
    assert sorted(ema.ema_state_dict()) == [
        "generator.0.bias", "generator.0.weight", "generator.1.bias", "generator.1.num_batches_tracked",
        "generator.1.running_mean", "generator.1.running_var", "generator.1.weight",
    ]  # fmt: skip
    step(ema, model, optimizer)
    trained = model.discriminator.weight.detach().clone()
    with ema.swapped():
        assert torch.equal(model.discriminator.weight, trained)  # not swapped: it keeps its training value
        assert not torch.equal(model.generator[0].weight, ema.raw_state_dict()["generator.0.weight"])
    only = ScaledEMA(Annealed(), None, momentum=0.5, include=["generator.0"])
    assert sorted(only.ema_state_dict()) == ["generator.0.bias", "generator.0.weight"]


def test_include_takes_a_non_persistent_buffer_only_by_its_exact_name():
    model = Annealed()
    model.generator.register_buffer("temperature", torch.tensor(2.0), persistent=False)
    by_prefix = ScaledEMA(model, None, momentum=0.9, include=["generator"])
    assert "generator.temperature" not in by_prefix.ema_state_dict()  # as with exclude=["discriminator"]
    exact = ScaledEMA(model, None, momentum=0.9, include=["generator", "generator.temperature"])
    assert "generator.temperature" in exact.ema_state_dict()
