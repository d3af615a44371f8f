"""ScaledEMA's saved state: `load_state_dict` takes a 0.1 state that averaged a non-persistent buffer and a
0-d tensor counter, and refuses a state that is not a dict, has bad counters or tensors, or a post-hoc state whose
last update is past its clock, before it changes anything. No Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Annealed, trained

from lightning_emascale import ScaledEMA


def test_a_saved_ema_of_a_non_persistent_buffer_from_0_1_still_loads():
    model = Annealed()
    everything = ScaledEMA(model, None, momentum=0.9, include=["generator", "discriminator", "temperature"])
    ema = ScaledEMA(model, None, momentum=0.9)
    ema.load_state_dict(everything.state_dict())  # 0.1 averaged every buffer
    assert "temperature" not in ema.ema_state_dict()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda s: s.update(skipped_updates="abc"), ValueError, r"has skipped_updates='abc'; an integer >= 0"),
        (lambda s: s.update(skipped_updates=float("nan")), ValueError, r"has skipped_updates=nan"),
        (lambda s: s.update(skipped_updates=-3), ValueError, r"has skipped_updates=-3"),
        (
            lambda s: s["ema"].update({"generator.0.weight": [1.0]}),
            TypeError,
            r"ema\['generator.0.weight'\] of type list",
        ),
        (lambda s: s.update(ema=None), TypeError, r"has ema of type NoneType; a dict of tensors"),
    ],
)
def test_a_bad_saved_state_raises_before_anything_changes(change, error, match):
    ema, state = trained()
    before = copy.deepcopy(ema.state_dict())
    change(state)
    with pytest.raises(error, match=match):
        ema.load_state_dict(state)
    after = ema.state_dict()
    assert {k: v for k, v in after.items() if k != "ema"} == {k: v for k, v in before.items() if k != "ema"}
    assert all(torch.equal(after["ema"][name], value) for name, value in before["ema"].items())


def test_a_saved_state_that_is_not_a_dict_and_tensor_counters():
    ema, state = trained()
    with pytest.raises(
        TypeError, match=r"The saved ScaledEMA state must be a dict \(from `state_dict\(\)`\), got list"
    ):
        ema.load_state_dict([])
    state["samples_seen"] = torch.tensor(24)  # a 0-d tensor is a number, stored as an int
    ema.load_state_dict(state)
    assert type(ema.state_dict()["samples_seen"]) is int


def test_a_post_hoc_state_whose_last_update_is_past_the_samples_seen_is_refused(tmp_path):
    ema = ScaledEMA(Annealed(), None, sigma_rels=[0.1], snapshot_every_samples=100, snapshot_dir=tmp_path)
    ema.count_samples(4)
    ema.end_step()
    state = ema.state_dict()
    state["samples_at_update"] = 999
    with pytest.raises(ValueError, match=r"samples_at_update=999 past samples_seen=4"):
        ema.load_state_dict(state)
