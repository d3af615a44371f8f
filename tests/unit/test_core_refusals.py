"""A refusal changes nothing: a ``ScaledEMA`` whose construction fails leaves the module's storage, its teachers'
``requires_grad`` and its attributes as they were, so that a corrected retry works; a second EMA of a module an
earlier ``flat_parameters`` EMA laid out in one buffer is built (a second fit); a momentum schedule that fails
mid-run raises before the optimizer moves the weights. No Trainer."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from helpers import Annealed, step

from lightning_emascale import ScaledEMA


def _storage(module: torch.nn.Module) -> list[int]:
    return [tensor.data_ptr() for tensor in module.state_dict(keep_vars=True).values()]


def _flat(*args, **kwargs) -> ScaledEMA:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # flat_parameters is deprecated
        return ScaledEMA(*args, flat_parameters=True, **kwargs)


@pytest.mark.parametrize(
    "bad, error",
    [
        ({"optimizer_rule": "adam"}, r"`optimizer_rule`='adam'|AdamScalingRule"),
        ({"momentum_attributes": {"no.such.path": 0.9}, "base_batch_size": 4}, r"names 'no.such.path'"),
    ],
    ids=["rule-does-not-fit", "bad-attribute-path"],
)
def test_a_failed_flat_parameters_construction_leaves_the_storage_and_a_retry_works(bad, error):
    model = Annealed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _storage(model)
    with pytest.raises(ValueError, match=error):
        _flat(model, optimizer, momentum=0.9, **bad)
    assert _storage(model) == before  # nothing moved into a flat buffer
    ema = _flat(model, optimizer, momentum=0.9)  # the corrected retry is not refused as "tied"
    step(ema, model, optimizer)
    assert ema.ema_updates == 1


def test_a_second_flat_parameters_ema_of_the_same_module_is_built_and_averages():
    model = Annealed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = _flat(model, optimizer, momentum=0.9)
    step(first, model, optimizer)
    first.detach()
    second = _flat(model, optimizer, momentum=0.5)  # a second fit: the tensors live in the first one's buffer
    start = {name: tensor.clone() for name, tensor in second.ema_state_dict().items()}
    step(second, model, optimizer)
    for name, tensor in second.ema_state_dict().items():
        if tensor.is_floating_point():
            expected = 0.5 * start[name] + 0.5 * model.state_dict()[name]
            torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7)


def test_flat_parameters_still_refuse_tensors_that_overlap_in_memory():
    model = Annealed()
    model.alias = torch.nn.Parameter(torch.empty(0))
    model.alias.data = model.discriminator.weight.data[:, :2]  # a view into another parameter
    before = _storage(model)
    with pytest.raises(ValueError, match=r"would untie tensors that share memory"):
        _flat(model, None, momentum=0.9)
    assert _storage(model) == before


def test_freeze_teachers_then_a_refusal_leaves_the_teachers_trainable():
    module = torch.nn.ModuleDict({"online": torch.nn.Linear(3, 2)})
    module["teacher"] = copy.deepcopy(module["online"])  # still requires grad
    optimizer = torch.optim.SGD(module["online"].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"AdamScalingRule|'adam'"):
        ScaledEMA(
            module, optimizer, momentum=0.9, teachers={"online": "teacher"}, freeze_teachers=True, optimizer_rule="adam"
        )
    assert all(p.requires_grad for p in module["teacher"].parameters())


def test_an_optimizer_that_holds_none_of_the_module_parameters_warns():
    model, other = Annealed(), torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.warns(
        UserWarning, match=r"`optimizers` \(SGD\) hold none of the parameters of the module \(Annealed\)"
    ):
        ScaledEMA(model, optimizer, momentum=0.9)  # master weights written back stay possible: a warning
    extra = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # beside one that trains the module
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ScaledEMA(model, [torch.optim.SGD(model.parameters(), lr=0.1), extra], momentum=0.9, auto_end_step=False)


def _nan_after_one_step(progress: float) -> float:
    return math.nan if 0.3 < progress < 0.9 else 0.9


def test_a_second_optimizer_of_a_step_does_not_check_the_next_steps_momentum():
    model = Annealed()
    first = torch.optim.SGD(model.generator.parameters(), lr=0.1)
    second = torch.optim.SGD(model.discriminator.parameters(), lr=0.1)
    ema = ScaledEMA(model, [first, second], momentum_schedule=_nan_after_one_step, total_samples=8,
                    auto_end_step=False)  # fmt: skip
    model(torch.randn(4, 3)).pow(2).mean().backward()
    ema.count_samples(4)
    first.step()  # counts the step: the clock reads 0.5 now
    second.step()  # the same step: not refused for the momentum of the next one
    ema.end_step()
    assert (ema.optimizer_steps, ema.ema_updates) == (1, 1)


class _ReadOnlyCenter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    @property
    def center_momentum(self) -> float:
        return 0.9


def test_a_read_only_momentum_attribute_is_refused_when_built():
    with pytest.raises(ValueError, match=r"names 'center_momentum', a read-only property of _ReadOnlyCenter"):
        ScaledEMA(_ReadOnlyCenter(), None, base_batch_size=4, momentum_attributes={"center_momentum": 0.9})


def _nan_after_half(progress: float) -> float:
    return math.nan if 0.4 < progress < 0.6 else 0.9


def test_a_schedule_that_fails_mid_run_raises_before_the_step_moves_the_weights():
    model = Annealed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum_schedule=_nan_after_half, total_samples=16)
    step(ema, model, optimizer)
    step(ema, model, optimizer)  # progress 0.25 -> 0.5 on the clock before the next step
    model(torch.randn(4, 3)).pow(2).mean().backward()
    ema.count_samples(4)
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"momentum_schedule\(0.5\)"):
        optimizer.step()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name  # the step never ran
    assert (ema.optimizer_steps, ema.samples_seen) == (2, 8)


@pytest.mark.parametrize(
    "name, value, dtype",
    [
        ("generator.0.weight", torch.zeros(4, 3, dtype=torch.int64), "torch.int64"),
        ("generator.1.num_batches_tracked", torch.tensor(True), "torch.bool"),
    ],
)
def test_a_saved_ema_of_the_wrong_kind_of_dtype_is_refused_not_cast(name, value, dtype):
    model = Annealed()
    ema = ScaledEMA(model, None, momentum=0.9)
    state = ema.state_dict()
    state = {**state, "ema": {**state["ema"], name: value}}
    before = {key: tensor.clone() for key, tensor in ema.ema_state_dict().items()}
    with pytest.raises(TypeError, match=rf"The saved EMA of '{name}' has dtype {dtype}, the model's is torch"):
        ema.load_state_dict(state)
    for key, tensor in ema.ema_state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_a_snapshot_dir_that_no_directory_can_be_made_at_is_refused_when_built(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for bad, message in [
        (str(tmp_path / "a\x00b"), r"`snapshot_dir`=.* holds a NUL byte"),
        (afile / "below", r"`snapshot_dir`=.* lies below .*afile', an existing file"),
        (afile, r"`snapshot_dir`=.* is an existing file, not a directory"),
    ]:
        with pytest.raises(ValueError, match=message):
            ScaledEMA(Annealed(), None, sigma_rels=(0.05,), snapshot_every_samples=8, snapshot_dir=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


class _IntegerCenter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.register_buffer("center_momentum", torch.tensor(1))


def test_an_integer_tensor_momentum_attribute_is_refused_not_truncated():
    with pytest.raises(ValueError, match=r"names 'center_momentum', a torch.int64 tensor, which cannot hold"):
        ScaledEMA(_IntegerCenter(), None, base_batch_size=4, momentum_attributes={"center_momentum": 0.9})


def test_a_module_without_tensors_is_refused():
    with pytest.raises(ValueError, match=r"ReLU has no parameters or buffers, so there is nothing to average"):
        ScaledEMA(torch.nn.ReLU(), None, momentum=0.9)


def test_a_huge_momentum_attribute_is_shown_as_given():
    with pytest.raises(ValueError, match=r"momentum_attributes\['c'\].* got 1e\+400 \(an integer of 401 digits\)"):
        ScaledEMA(Annealed(), None, base_batch_size=4, momentum_attributes={"c": 10**400})


def test_an_infinite_average_of_a_parameter_is_refused_and_of_a_mask_buffer_kept():
    model = Annealed()
    model.register_buffer("mask", torch.tensor([0.0, -math.inf]))
    ema = ScaledEMA(model, None, momentum=0.9)
    state = ema.state_dict()
    ema.load_state_dict(state)  # the mask's -inf is copied, not averaged: no corruption
    bad = {**state, "ema": {**state["ema"], "discriminator.bias": torch.tensor([math.inf])}}
    with pytest.raises(
        ValueError, match=r"The saved EMA of 'discriminator.bias' \(a parameter\) is non-finite \(inf\)"
    ):
        ema.load_state_dict(bad)
