"""A checkpoint written by lightning-emascale 0.1.0 (tests/data, made by make_v0_1_checkpoints.py) still loads
and resumes to the very weights and EMA that 0.1.0 itself reached."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from helpers import TinyModel

DATA = Path(__file__).parents[1] / "data"
sys.path.insert(0, str(DATA))
from make_v0_1_checkpoints import run  # noqa: E402


def test_a_0_1_checkpoint_resumes_to_what_0_1_reached():
    expected = torch.load(DATA / "v0_1_polyak_resumed.pt", weights_only=False)
    _, model, callback = run(2, ckpt_path=DATA / "v0_1_polyak.ckpt")
    assert (callback.samples_seen, callback.optimizer_steps) == (expected["samples_seen"], expected["optimizer_steps"])
    for name, value in expected["raw"].items():
        assert torch.equal(model.state_dict()[name], value), name
    for name, value in expected["ema"].items():
        assert torch.equal(callback.ema_state_dict()[name], value), name


def test_a_0_1_checkpoint_loads_its_ema_for_inference():
    checkpoint = torch.load(DATA / "v0_1_polyak.ckpt", weights_only=False)
    state = checkpoint["callbacks"]["EMAScalingCallback{'name': 'ema'}"]
    loaded = TinyModel.load_from_checkpoint(DATA / "v0_1_polyak.ckpt")
    for name, value in state["ema"].items():
        assert torch.equal(loaded.state_dict()[name], value.to(loaded.state_dict()[name].dtype)), name
    assert not torch.equal(loaded.state_dict()["net.0.weight"], state["raw_state_dict"]["net.0.weight"])
