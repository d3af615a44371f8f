"""`skip_non_finite=True`: an update that would read a NaN or inf weight is skipped and counted (in the
metrics and the saved state) for the Polyak EMA, teachers and post-hoc EMAs alike, while empty tensors and
buffers that hold -inf on purpose (attention masks) are copied, not skipped nor averaged into NaN. No Trainer."""

from __future__ import annotations

import copy

import torch
from helpers import Annealed, step

from lightning_emascale import ScaledEMA


def test_skip_non_finite_leaves_the_ema_where_it_was_and_counts():
    model = Annealed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.9, skip_non_finite=True)
    step(ema, model, optimizer)
    before = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    with torch.no_grad():
        model.generator[0].weight[0, 0] = float("inf")
    ema.count_samples(4)
    optimizer.step()  # no gradients: the step changes nothing, the EMA update reads the inf
    assert ema.skipped_updates == 1 and ema.ema_updates == 2
    for name, value in ema.ema_state_dict().items():
        assert torch.equal(value, before[name]), name  # integer buffers too
    assert ema.metrics()["ema/skipped_updates"] == 1.0
    with torch.no_grad():
        model.generator[0].weight[0, 0] = 0.0
    ema.count_samples(4)
    optimizer.step()
    assert ema.skipped_updates == 1 and not torch.equal(
        ema.ema_state_dict()["generator.0.weight"], before["generator.0.weight"]
    )
    restored = ScaledEMA(Annealed(), None, momentum=0.9, skip_non_finite=True)
    restored.load_state_dict(ema.state_dict())
    assert restored.skipped_updates == 1


def test_skip_non_finite_guards_teachers_and_post_hoc_emas(tmp_path):
    online = torch.nn.Linear(3, 2)
    module = torch.nn.ModuleDict({"online": online, "teacher": copy.deepcopy(online).requires_grad_(False)})
    ema = ScaledEMA(module, None, momentum=0.5, teachers={"online": "teacher"}, skip_non_finite=True)
    teacher_before = module["teacher"].weight.clone()
    with torch.no_grad():
        online.weight[0, 0] = float("nan")
    ema.count_samples(2)
    ema.end_step()
    assert torch.equal(module["teacher"].weight, teacher_before) and ema.skipped_updates == 1

    model = Annealed()
    post_hoc = ScaledEMA(
        model, None, sigma_rels=[0.1], snapshot_every_samples=100, snapshot_dir=tmp_path, skip_non_finite=True
    )
    post_hoc.count_samples(2)
    post_hoc.end_step()
    kept = post_hoc.averager.states[0].averages[0].clone()
    with torch.no_grad():
        model.generator[0].weight.fill_(float("nan"))
    post_hoc.count_samples(2)
    post_hoc.end_step()
    assert torch.equal(post_hoc.averager.states[0].averages[0], kept) and post_hoc.skipped_updates == 1


def test_skip_non_finite_takes_empty_tensors_and_infinite_buffers():
    model = Annealed()
    model.register_buffer("empty", torch.empty(0))
    model.register_buffer("mask", torch.full((2,), float("-inf")))  # an attention mask, -inf on purpose
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.9, skip_non_finite=True)
    step(ema, model, optimizer)
    assert ema.skipped_updates == 0  # raised on the empty tensor, skipped for the mask before
    with torch.no_grad():
        model.mask[0] = float("nan")  # a NaN buffer is never on purpose
    step(ema, model, optimizer)
    assert ema.skipped_updates == 1


def test_a_mask_buffer_holding_minus_inf_is_copied_not_averaged_into_nan():
    model = Annealed()
    model.register_buffer("mask", torch.tensor([0.0, float("-inf")]))
    ema = ScaledEMA(model, None, momentum=0.9, skip_non_finite=True)
    ema.count_samples(4)
    ema.end_step()
    assert ema.ema_state_dict()["mask"].tolist() == [0.0, float("-inf")] and ema.skipped_updates == 0
