"""Checkpoints written by earlier code still load and resume to the very weights and EMA that code reached.

Two sets, under tests/data: one written by lightning-emascale 0.1.0 (make_v0_1_checkpoints.py, a Polyak EMA) and
one per mode (Polyak, teacher, post-hoc) written by the code before the averager/store redesign
(make_pre_protocol_checkpoints.py).

The training itself (matmul and BatchNorm kernels) rounds differently on another CPU, by ~1e-6, whatever this
library does. So each test first re-runs the checkpoint's first epoch from scratch: where that reproduces the
checkpoint's training weights bit for bit (this CPU computes like the one that wrote it), the resume must match
``torch.equal``; elsewhere to float32 rounding. What was loaded (the EMA, the clock) must match exactly on any CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import TinyModel

DATA = Path(__file__).parents[1] / "data"
sys.path.insert(0, str(DATA))
import make_pre_protocol_checkpoints as pre_protocol  # noqa: E402
from make_v0_1_checkpoints import run as run_v0_1  # noqa: E402


def saved_raw_weights(checkpoint: dict, key: str) -> dict[str, torch.Tensor]:
    """The training weights a checkpoint holds: in the callback's state when ``state_dict`` holds the EMA."""
    state = checkpoint["callbacks"][key]
    return state.get("raw_state_dict") or checkpoint["state_dict"]


def same_kernels(model: torch.nn.Module, checkpoint: dict, key: str) -> bool:
    """Whether ``model``, trained from scratch for the checkpoint's first epoch here, holds its weights exactly."""
    saved = saved_raw_weights(checkpoint, key)
    return all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())


def assert_reached(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for name, value in expected.items():
        if exact:
            assert torch.equal(got[name], value), (what, name)
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=f"{what} {name}")


def test_a_0_1_checkpoint_resumes_to_what_0_1_reached():
    checkpoint = torch.load(DATA / "v0_1_polyak.ckpt", weights_only=False)
    _, first_epoch, _ = run_v0_1(1)
    exact = same_kernels(first_epoch, checkpoint, "EMAScalingCallback{'name': 'ema'}")
    expected = torch.load(DATA / "v0_1_polyak_resumed.pt", weights_only=False)
    _, model, callback = run_v0_1(2, ckpt_path=DATA / "v0_1_polyak.ckpt")
    assert (callback.samples_seen, callback.optimizer_steps) == (expected["samples_seen"], expected["optimizer_steps"])
    assert_reached(model.state_dict(), expected["raw"], exact, "raw")
    ema = callback.ema_state_dict()
    assert_reached({name: ema[name] for name in expected["ema"]}, expected["ema"], exact, "ema")


def test_a_0_1_checkpoint_loads_its_ema_for_inference():
    checkpoint = torch.load(DATA / "v0_1_polyak.ckpt", weights_only=False)
    state = checkpoint["callbacks"]["EMAScalingCallback{'name': 'ema'}"]
    loaded = TinyModel.load_from_checkpoint(DATA / "v0_1_polyak.ckpt")
    for name, value in state["ema"].items():
        assert torch.equal(loaded.state_dict()[name], value.to(loaded.state_dict()[name].dtype)), name
    assert not torch.equal(loaded.state_dict()["net.0.weight"], state["raw_state_dict"]["net.0.weight"])


@pytest.mark.parametrize("mode", pre_protocol.MODES)
def test_a_pre_protocol_checkpoint_resumes_to_what_that_code_reached(mode, tmp_path):
    """Polyak, teacher and post-hoc checkpoints written before the redesign resume to what that code reached."""
    path = DATA / f"pre_protocol_{mode}.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    _, first_epoch, callback = pre_protocol.run(mode, 1, tmp_path / "scratch")
    exact = same_kernels(first_epoch, checkpoint, callback.state_key)
    expected = torch.load(DATA / f"pre_protocol_{mode}_resumed.pt", weights_only=False)
    _, model, callback = pre_protocol.run(mode, 2, tmp_path / "resumed", ckpt_path=path)
    got = pre_protocol.reached(mode, model, callback)
    for key in ("samples_seen", "optimizer_steps", "ema_updates"):
        assert got[key] == expected[key], key
    assert_reached(got["raw"], expected["raw"], exact, "raw")
    assert_reached(got["ema"], expected["ema"], exact, "ema")


@pytest.mark.parametrize("mode", pre_protocol.MODES)
def test_a_pre_protocol_checkpoint_loads_its_state_exactly(mode, tmp_path):
    """On any CPU: the clock and the EMA (or the teachers) loaded from the checkpoint are the saved ones."""
    path = DATA / f"pre_protocol_{mode}.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    _, model, callback = pre_protocol.run(mode, 1, tmp_path, ckpt_path=path)  # loads, trains no step
    state = checkpoint["callbacks"][callback.state_key]
    assert (callback.samples_seen, callback.optimizer_steps) == (state["samples_seen"], state["optimizer_steps"])
    now = callback.scaled_ema.state_dict()
    if mode == "teacher":
        teachers = {k: v for k, v in checkpoint["state_dict"].items() if "_momentum." in k}
        assert_reached({k: model.state_dict()[k] for k in teachers}, teachers, True, "teachers")
    else:
        key = "ema" if mode == "polyak" else "power_ema"
        assert now[key].keys() == state[key].keys()
        flat = (
            (lambda d: d)
            if mode == "polyak"
            else (lambda d: {f"{s}/{k}": v for s, a in d.items() for k, v in a.items()})
        )
        assert_reached(flat(now[key]), flat(state[key]), True, key)
    assert now["pending_decay"] == state["pending_decay"]
