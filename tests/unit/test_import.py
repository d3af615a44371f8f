"""The package root and its core import no Lightning: a plain-PyTorch user pays for torch alone."""

import subprocess
import sys
import textwrap

import pytest

import lightning_emascale

PLAIN_LOOP = """
import sys
import torch
import lightning_emascale
from lightning_emascale import SampleClockLR, ScaledEMA, WarmupCosine, scale_ema_momentum

model = torch.nn.Linear(2, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
ema = ScaledEMA(model, optimizer, momentum=0.99, base_batch_size=2, optimizer_rule="sgd", total_samples=8)
SampleClockLR(optimizer, WarmupCosine(), clock=ema)
model(torch.randn(4, 2)).sum().backward()
ema.count_samples(4)
optimizer.step()
assert ema.kappa == 2.0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics"})
print("loaded:", loaded)
lightning_emascale.EMAScalingCallback
print("after:", "lightning.pytorch" in sys.modules)
"""


def test_the_core_imports_no_lightning_and_the_callbacks_load_on_first_use():
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PLAIN_LOOP)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded: []" in proc.stdout
    assert "after: True" in proc.stdout


def test_the_public_api_is_small_sorted_and_complete():
    assert lightning_emascale.__all__ == sorted(lightning_emascale.__all__)
    for name in lightning_emascale.__all__:
        assert getattr(lightning_emascale, name) is not None
    assert set(lightning_emascale.__all__) <= set(dir(lightning_emascale))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match=r"module 'lightning_emascale' has no attribute 'EMACallback'"):
        lightning_emascale.EMACallback  # noqa: B018
