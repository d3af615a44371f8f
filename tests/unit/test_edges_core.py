"""The core's answers to the edges users hit: what is averaged, non-finite weights, teachers that change,
measured batch sizes, readable metrics. No Lightning."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from lightning_emascale import ScaledEMA
from lightning_emascale._batch import measure_batch_size


class Annealed(torch.nn.Module):
    """A generator, a discriminator and an annealed temperature that is not in the state_dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.generator = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        self.discriminator = torch.nn.Linear(4, 1)
        self.register_buffer("temperature", torch.tensor(1.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(self.generator(x)) / self.temperature


def step(ema: ScaledEMA, model: torch.nn.Module, optimizer: torch.optim.Optimizer, size: int = 4) -> None:
    model(torch.randn(size, 3)).pow(2).mean().backward()
    ema.count_samples(size)
    optimizer.step()
    optimizer.zero_grad()


# --------------------------------------------------------------------------------------- what is averaged
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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exclude": "discriminator"}, r"`exclude` must be a list of .* names, got 'discriminator' \(write \["),
        ({"include": ["gen"]}, r"`include` names 'gen', which is no parameter, buffer or submodule of Annealed"),
        ({"exclude": ["generator", "generator"]}, r"`exclude` lists a name twice"),
        ({"exclude": [""]}, r"`exclude` must hold non-empty strings"),
        ({"include": ["discriminator"], "exclude": ["discriminator"]}, r"leave nothing of Annealed to average"),
        ({"freeze_teachers": True}, r"`freeze_teachers=True` freezes the teachers of teacher mode"),
        ({"skip_non_finite": 1}, r"`skip_non_finite` must be True or False"),
        ({"exclude": ["x"], "teachers": {"generator": "discriminator"}}, r"in teacher mode the teachers are"),
    ],
)
def test_selection_errors_name_the_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScaledEMA(Annealed(), None, momentum=0.9, **kwargs)


def test_a_saved_ema_of_a_non_persistent_buffer_from_0_1_still_loads():
    model = Annealed()
    everything = ScaledEMA(model, None, momentum=0.9, include=["generator", "discriminator", "temperature"])
    ema = ScaledEMA(model, None, momentum=0.9)
    ema.load_state_dict(everything.state_dict())  # 0.1 averaged every buffer
    assert "temperature" not in ema.ema_state_dict()


# ---------------------------------------------------------------------------------------------- non-finite
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


# ------------------------------------------------------------------------------------------------ teachers
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


# ------------------------------------------------------------------------------------------- batch sizes
@pytest.mark.parametrize(
    ("batch", "size"),
    [
        ((torch.zeros(4, 6), torch.zeros(4)), 4),
        ({"x": [torch.zeros(4)] * 6, "y": torch.zeros(4)}, 4),  # default_collate of a list-valued feature
        ({"ids": [[1, 2, 3]] * 5, "x": torch.zeros(5, 3)}, 5),  # a list of per-sample lists
        ([[torch.zeros(2, 3), torch.zeros(2, 3)], torch.zeros(2), ["a.png", "b.png"]], 2),  # lightly's views
        ({"scale": torch.tensor(0.5), "x": torch.zeros(3, 1)}, 3),  # a 0-d tensor has no batch dimension
    ],
)
def test_measure_batch_size_agrees_across_the_batch(batch, size):
    assert measure_batch_size(batch) == size


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"meta": torch.tensor([7]), "x": torch.zeros(4, 3)}, r"ambiguous.*\['meta'\]: 1, \['x'\]: 4"),
        ({"x": torch.zeros(4, 3), "ids": [1, 2, 3]}, r"ambiguous.*\['ids'\]: 3"),
        ({"a": "text", "b": 3}, r"Cannot measure the batch size of a dict"),
    ],
)
def test_an_ambiguous_or_unmeasurable_batch_raises(batch, match):
    with pytest.raises(ValueError, match=match):
        measure_batch_size(batch)


# ---------------------------------------------------------------------------------------------- metrics
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


# ------------------------------------------------------------------- found by a sweep of 845 bad inputs
def _trained() -> tuple[ScaledEMA, dict]:
    model = Annealed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.9, skip_non_finite=True)
    step(ema, model, optimizer)
    return ema, copy.deepcopy(ema.state_dict())


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
    ema, state = _trained()
    before = copy.deepcopy(ema.state_dict())
    change(state)
    with pytest.raises(error, match=match):
        ema.load_state_dict(state)
    after = ema.state_dict()
    assert {k: v for k, v in after.items() if k != "ema"} == {k: v for k, v in before.items() if k != "ema"}
    assert all(torch.equal(after["ema"][name], value) for name, value in before["ema"].items())


def test_a_saved_state_that_is_not_a_dict_and_tensor_counters():
    ema, state = _trained()
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


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"momentum": None, "momentum_schedule": lambda: 0.9},
            TypeError,
            r"`momentum_schedule` must be a callable of one",
        ),
        ({"include": []}, ValueError, r"`include` is empty, which averages nothing"),
        ({"teachers": {"generator": "generator"}}, ValueError, r"`teachers` maps 'generator' to itself"),
        (
            {"teachers": {"generator": "x"}, "ema_precision": "model"},
            ValueError,
            r"`ema_precision`='model' has no effect",
        ),
        (
            {"optimizer_rule": __import__("lightning_emascale").OptimizerRule()},
            ValueError,
            r"does not implement `scale",
        ),
        (
            {"sigma_rels": [0.2887], "snapshot_every_samples": 8, "snapshot_dir": "d"},
            ValueError,
            r"= 0.288675\] .*, got 0.2887",
        ),
    ],
)
def test_options_found_silent_or_unclear_now_raise_when_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        ScaledEMA(Annealed(), None, **({} if "sigma_rels" in kwargs else {"momentum": 0.9}) | kwargs)


def test_a_snapshot_dir_that_is_a_file_and_numpy_sigma_rels(tmp_path):
    existing = tmp_path / "file"
    existing.write_text("")
    with pytest.raises(ValueError, match=r"`snapshot_dir`=.*file' is an existing file, not a directory"):
        ScaledEMA(Annealed(), None, sigma_rels=[0.1], snapshot_every_samples=8, snapshot_dir=existing)
    ema = ScaledEMA(Annealed(), None, sigma_rels=np.array([0.05, 0.1]), snapshot_every_samples=8, snapshot_dir=tmp_path)
    assert ema.options.sigma_rels == (0.05, 0.1)


def test_freeze_teachers_freezes_nothing_when_the_mapping_is_bad():
    module = torch.nn.ModuleDict({"online": torch.nn.Linear(3, 2), "other": torch.nn.Linear(3, 5)})
    module["teacher"] = copy.deepcopy(module["online"])
    with pytest.raises(ValueError, match=r"`teachers` names 'missing'"):
        ScaledEMA(module, None, momentum=0.9, teachers={"online": "teacher", "other": "missing"}, freeze_teachers=True)
    assert all(p.requires_grad for p in module["teacher"].parameters())


def test_total_samples_from_must_return_a_positive_integer():
    ema = ScaledEMA(Annealed(), None, momentum=0.9, momentum_schedule="cosine", final_momentum=1.0,
                    total_samples_from=lambda: 0)  # fmt: skip
    with pytest.raises(ValueError, match=r"`total_samples_from` must return a positive integer .*, got 0"):
        _ = ema.progress


def test_metric_prefixes_counters_and_last_epoch_are_checked(tmp_path):
    ema, state = _trained()
    with pytest.raises(ValueError, match=r"`prefix` must be a non-empty string, got None"):
        ema.metrics(prefix=None)
    state["ema_updates"] = 100
    with pytest.raises(ValueError, match=r"ema_updates=100 past optimizer_steps=1"):
        ema.load_state_dict(state)
    from lightning_emascale import SampleClockLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"`last_epoch` must be an integer >= -1 \(-1 starts afresh\), got 'x'"):
        SampleClockLR(optimizer, lambda progress: 1.0, last_epoch="x")


# ------------------------------------------------------------------------------ found by a review of the change
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


def test_include_takes_a_non_persistent_buffer_only_by_its_exact_name():
    model = Annealed()
    model.generator.register_buffer("temperature", torch.tensor(2.0), persistent=False)
    by_prefix = ScaledEMA(model, None, momentum=0.9, include=["generator"])
    assert "generator.temperature" not in by_prefix.ema_state_dict()  # as with exclude=["discriminator"]
    exact = ScaledEMA(model, None, momentum=0.9, include=["generator", "generator.temperature"])
    assert "generator.temperature" in exact.ema_state_dict()


@pytest.mark.parametrize(
    ("batch", "size"),
    [
        ((np.zeros((4, 3)), np.zeros(4)), 4),  # numpy arrays have a batch dimension, like tensors
        ([{"image": torch.zeros(3, 8, 8), "boxes": torch.zeros(2, 4)}] * 5, 5),  # detection: a list of records
    ],
)
def test_numpy_batches_and_lists_of_records(batch, size):
    assert measure_batch_size(batch) == size


def test_lists_of_per_view_dicts_share_their_batch_dimension():
    # two dataloaders (or views) whose batches are dicts of 8: 8 samples, not 2 "records"
    assert measure_batch_size([{"x": torch.zeros(8, 3)}, {"x": torch.zeros(8, 3)}]) == 8


def test_a_mask_buffer_holding_minus_inf_is_copied_not_averaged_into_nan():
    model = Annealed()
    model.register_buffer("mask", torch.tensor([0.0, float("-inf")]))
    ema = ScaledEMA(model, None, momentum=0.9, skip_non_finite=True)
    ema.count_samples(4)
    ema.end_step()
    assert ema.ema_state_dict()["mask"].tolist() == [0.0, float("-inf")] and ema.skipped_updates == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"offload": True, "skip_non_finite": True},
        {"offload": True, "flat_parameters": True},
        {"offload": True, "teachers": {"generator": "discriminator"}},
        {"flat_parameters": True, "teachers": {"generator": "discriminator"}},
    ],
)
def test_offload_and_flat_parameters_say_what_they_do_not_combine_with(kwargs):
    with pytest.raises(ValueError, match=r"`(offload|flat_parameters)=True` .* (not combine|does not apply)"):
        ScaledEMA(Annealed(), None, momentum=0.9, **kwargs)


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


def test_the_adam_rule_scales_adamw_weight_decay_also_without_the_newer_group_key():
    """AdamW before it became an Adam subclass (pytorch PR #118857) had param groups without `decoupled_weight_decay`."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.05)
    for group in optimizer.param_groups:
        group.pop("decoupled_weight_decay", None)  # as an older AdamW builds them
    ema = ScaledEMA(model, optimizer, momentum=0.9, base_batch_size=8, optimizer_rule="adam")
    seen = []  # a pre-hook registered after the EMA's sees the step's values
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["weight_decay"]))
    model(torch.randn(32, 4)).sum().backward()
    ema.count_samples(32)  # kappa 4
    optimizer.step()
    assert seen == [pytest.approx(0.05 * 2)]  # sqrt(4) x the decoupled weight decay, during the step
    assert optimizer.param_groups[0]["weight_decay"] == 0.05  # restored after it
