"""ScaledEMA over its life: `reset()` while the EMA is swapped into the model raises before the clock
changes, and `attach()` to a new optimizer after the module was converted (`.double().float()`) makes flat
parameters follow the module's new tensors. No Trainer."""

from __future__ import annotations

import pytest
import torch

from lightning_emascale import ScaledEMA

# flat_parameters is deprecated (test_flat_parameters_is_deprecated_with_the_measurements): its tests silence that
pytestmark = pytest.mark.filterwarnings("ignore:`flat_parameters=True` is deprecated:FutureWarning")


def test_reset_while_swapped_raises_before_the_clock_changes():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.9, base_batch_size=8)
    model(torch.randn(8, 4)).sum().backward()
    ema.count_samples(8)
    optimizer.step()
    with ema.swapped():
        with pytest.raises(RuntimeError, match=r"reset\(\) while the EMA is swapped into the model"):
            ema.reset()
    assert ema.samples_seen == 8 and ema.ema_updates == 1


def test_flat_parameters_follow_a_converted_module_after_attach():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.0, base_batch_size=8, flat_parameters=True)
    model.double().float()  # `.data` replaced: same device, dtype and strides
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema.attach(optimizer)
    model(torch.randn(8, 4)).sum().backward()
    ema.count_samples(8)
    optimizer.step()  # momentum 0: the EMA equals the weights
    assert torch.equal(ema.ema_state_dict()["weight"], model.weight.detach())
