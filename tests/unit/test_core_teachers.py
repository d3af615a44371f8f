"""Teacher mode in the core: a teacher replaced at its path (lightly's SMoG) is paired again and checked
against its online twin as when built, and `freeze_teachers=True` freezes a teacher that still requires grad,
but freezes nothing when the `teachers` mapping is refused. No Trainer."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_emascale import ScaledEMA


def test_teachers_replaced_at_their_path_are_paired_again_with_the_same_checks():
    module = torch.nn.ModuleDict({"online": torch.nn.Linear(3, 2)})
    module["teacher"] = copy.deepcopy(module["online"]).requires_grad_(False)
    ema = ScaledEMA(module, None, momentum=0.0, teachers={"online": "teacher"})
    module["teacher"] = copy.deepcopy(module["teacher"])  # lightly's SMoG does this every 300 steps
    ema.count_samples(2)
    ema.end_step()
    assert torch.equal(module["teacher"].weight, module["online"].weight)  # momentum 0: the live teacher = online
    module["teacher"] = torch.nn.Linear(3, 5).requires_grad_(False)
    ema.count_samples(2)
    with pytest.raises(ValueError, match=r"Teacher 'teacher' does not mirror 'online': `weight` has shape \(5, 3\)"):
        ema.end_step()


def test_freeze_teachers_freezes_them_when_built():
    module = torch.nn.ModuleDict({"online": torch.nn.Linear(3, 2)})
    module["teacher"] = copy.deepcopy(module["online"])  # still requires grad (lightly's I-JEPA)
    with pytest.raises(ValueError, match=r"still requires grad .* or pass `freeze_teachers=True`"):
        ScaledEMA(module, None, momentum=0.9, teachers={"online": "teacher"})
    ScaledEMA(module, None, momentum=0.9, teachers={"online": "teacher"}, freeze_teachers=True)
    assert not any(p.requires_grad for p in module["teacher"].parameters())
    assert all(p.requires_grad for p in module["online"].parameters())


def test_freeze_teachers_freezes_nothing_when_the_mapping_is_bad():
    module = torch.nn.ModuleDict({"online": torch.nn.Linear(3, 2), "other": torch.nn.Linear(3, 5)})
    module["teacher"] = copy.deepcopy(module["online"])
    with pytest.raises(ValueError, match=r"`teachers` names 'missing'"):
        ScaledEMA(module, None, momentum=0.9, teachers={"online": "teacher", "other": "missing"}, freeze_teachers=True)
    assert all(p.requires_grad for p in module["teacher"].parameters())
