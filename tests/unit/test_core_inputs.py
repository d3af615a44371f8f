"""ScaledEMA's arguments, checked when it is built or first read: a wrong type, an unknown or repeated name,
an empty selection, options that do not combine (offload, flat parameters, teachers, post-hoc), a bad snapshot
directory or `total_samples_from`, a metric prefix and SampleClockLR's `last_epoch`. Each raises an error that
names the argument and the value given, and the values that are accepted (numpy `sigma_rels`) are taken.
No Trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import Annealed, trained

from lightning_emascale import SampleClockLR, ScaledEMA

# flat_parameters is deprecated (test_flat_parameters_is_deprecated_with_the_measurements): its tests silence that
pytestmark = pytest.mark.filterwarnings("ignore:`flat_parameters=True` is deprecated:FutureWarning")


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


def test_a_snapshot_dir_that_is_a_file_and_numpy_sigma_rels(tmp_path):
    existing = tmp_path / "file"
    existing.write_text("")
    with pytest.raises(ValueError, match=r"`snapshot_dir`=.*file' is an existing file, not a directory"):
        ScaledEMA(Annealed(), None, sigma_rels=[0.1], snapshot_every_samples=8, snapshot_dir=existing)
    ema = ScaledEMA(Annealed(), None, sigma_rels=np.array([0.05, 0.1]), snapshot_every_samples=8, snapshot_dir=tmp_path)
    assert ema.options.sigma_rels == (0.05, 0.1)


def test_total_samples_from_must_return_a_positive_integer():
    ema = ScaledEMA(Annealed(), None, momentum=0.9, momentum_schedule="cosine", final_momentum=1.0,
                    total_samples_from=lambda: 0)  # fmt: skip
    with pytest.raises(ValueError, match=r"`total_samples_from` must return a positive integer .*, got 0"):
        _ = ema.progress


def test_metric_prefixes_counters_and_last_epoch_are_checked(tmp_path):
    ema, state = trained()
    with pytest.raises(ValueError, match=r"`prefix` must be a non-empty string, got None"):
        ema.metrics(prefix=None)
    state["ema_updates"] = 100
    with pytest.raises(ValueError, match=r"ema_updates=100 past optimizer_steps=1"):
        ema.load_state_dict(state)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"`last_epoch` must be an integer >= -1 \(-1 starts afresh\), got 'x'"):
        SampleClockLR(optimizer, lambda progress: 1.0, last_epoch="x")


def test_flat_parameters_is_deprecated_with_the_measurements():
    """No whole training step was faster with it (benchmarks/ema_update.py, benchmarks/cuda_step.py): it warns for one
    release, at the user's line, and still works."""
    model = torch.nn.Linear(3, 2)
    with pytest.warns(FutureWarning, match=r"`flat_parameters=True` is deprecated .* no whole training step") as seen:
        ema = ScaledEMA(model, flat_parameters=True)
    assert seen[0].filename == __file__
    ema.count_samples(4)
    ema.end_step()
    assert ema.ema_updates == 1


POST_HOC = dict(sigma_rels=[0.1], snapshot_every_samples=4, snapshot_dir="snapshots")


@pytest.mark.parametrize(
    ("kwargs", "first"),
    [
        (dict(POST_HOC, ema_precision="bf16"), r"\{'ema_precision': 'bf16'\} have no effect on a post-hoc EMA"),
        (dict(POST_HOC, sigma_rels=[0.9], momentum=0.9), r"\{'momentum': 0.9\} have no effect on a post-hoc EMA"),
        (dict(teachers={"a": "t"}, copy_on_swap=True, momentum_attributes={"x": 0.9}), r"`copy_on_swap=True` changes"),
        (dict(teachers={"a": "a"}, momentum_attributes={"x": 0.9}), r"`teachers` maps 'a' to itself"),
        (dict(teachers={"a": "t"}, offload=True, skip_non_finite=True), r"does not combine with \['skip_non_finite'\]"),
        (dict(POST_HOC, offload=True, flat_parameters=True), r"does not combine with \['flat_parameters'\]"),
        (dict(teachers={"a": "t"}, include=(), ema_precision="model"), r"`include` is empty"),
    ],
)
def test_of_several_clashing_options_the_first_error_is_the_one_it_always_was(kwargs, first):
    """Each mode checks its own clashes, in the order the single options check had them (pinned from that code)."""
    module = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "t": torch.nn.Linear(2, 2).requires_grad_(False)})
    with pytest.raises(ValueError, match=first):
        ScaledEMA(module, **kwargs)


def test_from_options_checks_the_combinations_again():
    """An adapter's options go through the same clash checks as the constructor's arguments."""
    from lightning_emascale._options import EMAOptions

    module = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "t": torch.nn.Linear(2, 2).requires_grad_(False)})
    with pytest.raises(ValueError, match=r"`copy_on_swap=True` changes how a Polyak EMA is swapped in"):
        ScaledEMA.from_options(module, None, EMAOptions(teachers={"a": "t"}, copy_on_swap=True))
