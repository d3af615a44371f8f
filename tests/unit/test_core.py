"""ScaledEMA in a plain PyTorch loop: no Lightning anywhere."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_emascale import SampleClockLR, ScaledEMA, WarmupCosine, cosine_schedule


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(ema: ScaledEMA, model, optimizer, micro_batches: list[int], accumulate: int, record=None) -> None:
    """Micro-batches of the given sizes, an optimizer step every ``accumulate`` of them and at the end."""
    generator = torch.Generator().manual_seed(1)
    for index, size in enumerate(micro_batches):
        x = torch.randn(size, 3, generator=generator)
        (model(x).pow(2).mean() / accumulate).backward()
        ema.count_samples(size)
        if (index + 1) % accumulate == 0 or index + 1 == len(micro_batches):
            optimizer.step()
            optimizer.zero_grad()
            if record is not None:
                record.append(snapshot(model))


def reference(initial: dict, weights: list[dict], rhos: list[float], update_every: int = 1) -> dict:
    """zeta <- prod(rho-hat) zeta + (1 - prod) theta once every `update_every` steps, in float64."""
    ema = {k: v.double() for k, v in initial.items()}
    decay = 1.0
    for step, (state, rho) in enumerate(zip(weights, rhos), start=1):
        decay *= rho
        if step % update_every == 0:
            ema = {
                k: decay * ema[k] + (1 - decay) * v.double() if v.is_floating_point() else v.double()
                for k, v in state.items()
            }
            decay = 1.0
    return ema


def test_a_plain_loop_gets_kappa_rho_hat_and_the_ema_from_the_batches_seen():
    model = tiny_model()
    initial = snapshot(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = ScaledEMA(model, optimizer, momentum=0.9, base_batch_size=4, optimizer_rule="sgd")
    seen, record = [], []
    optimizer.register_step_post_hook(lambda *_: seen.append((ema.kappa, ema.ema_momentum, ema.step_lrs[0][0])))
    train(ema, model, optimizer, [4, 4, 4, 4, 2], accumulate=2, record=record)  # steps of 8, 8, 2
    assert [kappa for kappa, _, _ in seen] == [2.0, 2.0, 0.5]
    assert [rho for _, rho, _ in seen] == pytest.approx([0.81, 0.81, 0.9**0.5], rel=1e-15)
    assert [lr for _, _, lr in seen] == pytest.approx([0.2, 0.2, 0.05])
    assert optimizer.param_groups[0]["lr"] == 0.1  # restored right after every step
    assert (ema.samples_seen, ema.optimizer_steps, ema.ema_updates, ema.global_batch_size) == (18, 3, 3, 2)
    expected = reference(initial, record, [0.81, 0.81, 0.9**0.5])
    for name, value in ema.ema_state_dict().items():
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6, msg=name)
    assert ema.ema_state_dict()["1.num_batches_tracked"].item() == 5  # integer buffers are copied


def test_update_every_warmup_and_a_cosine_schedule_on_samples():
    model = tiny_model()
    initial = snapshot(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    ema = ScaledEMA(
        model, optimizer, momentum=0.9, final_momentum=0.99, momentum_schedule="cosine", base_batch_size=4,
        optimizer_rule="adam", update_every=2, warmup=True, total_samples=40,
    )  # fmt: skip
    record, rhos = [], []
    optimizer.register_step_post_hook(lambda *_: rhos.append(ema.ema_momentum))
    train(ema, model, optimizer, [8] * 5, accumulate=1, record=record)
    expected_rhos = []
    for samples_before in range(0, 40, 8):
        momentum = cosine_schedule(samples_before / 40, 0.9, 0.99)
        t = samples_before / 4
        expected_rhos.append(min(momentum, (1 + t) / (10 + t)) ** 2)
    assert rhos == pytest.approx(expected_rhos, rel=1e-12)
    assert ema.progress == 1.0 and ema.ema_updates == 2
    assert ema.state_dict()["pending_decay"] == pytest.approx(expected_rhos[-1])  # step 5 waits for step 6
    expected = reference(initial, record, expected_rhos, update_every=2)
    for name, value in ema.ema_state_dict().items():
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6, msg=name)


def test_a_callable_schedule_replaces_the_named_ones():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum_schedule=lambda p: 0.5 + 0.25 * p, base_batch_size=8, total_samples=32)
    seen = []
    optimizer.register_step_post_hook(lambda *_: seen.append(ema.ema_momentum))
    train(ema, model, optimizer, [8] * 4, accumulate=1)
    assert seen == pytest.approx([0.5, 0.5625, 0.625, 0.6875])


def test_base_batch_size_defaults_to_the_first_step_and_the_rule_never_leaks():
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99))
    ema = ScaledEMA(model, optimizer, momentum=0.99, optimizer_rule="adam")
    inside = []
    optimizer.register_step_pre_hook(lambda opt, *_: inside.append(dict(opt.param_groups[0])))
    train(ema, model, optimizer, [6, 6, 12], accumulate=1)
    assert ema.resolved_base_batch_size == 6 and ema.kappa == 2.0
    assert inside[0]["lr"] == pytest.approx(0.01) and inside[2]["lr"] == pytest.approx(0.01 * math.sqrt(2))
    assert inside[2]["betas"] == pytest.approx((0.8, 0.98)) and inside[2]["eps"] == pytest.approx(1e-8 / math.sqrt(2))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)


def test_several_optimizers_end_the_step_together():
    model = tiny_model()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[2].parameters(), lr=0.2)
    with pytest.raises(ValueError, match=r"`auto_end_step=True` ends the step in an optimizer's post-hook, but 2"):
        ScaledEMA(model, [first, second], momentum=0.9)
    ema = ScaledEMA(model, [first, second], momentum=0.9, base_batch_size=2, optimizer_rule="sgd", auto_end_step=False)
    model(torch.randn(4, 3)).sum().backward()
    ema.count_samples(4)
    first.step()
    second.step()
    ema.end_step()
    assert (ema.optimizer_steps, ema.ema_updates, ema.step_lrs) == (1, 1, [[0.2], [0.4]])
    assert ema.metrics()["ema/lr-SGD"] == 0.2 and ema.metrics()["ema/lr-SGD-1"] == 0.4  # LearningRateMonitor names


def test_no_optimizer_means_end_step_by_hand():
    model = tiny_model()
    ema = ScaledEMA(model, momentum=0.5, base_batch_size=2)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.count_samples(2)
    ema.end_step()
    before = snapshot(model)["0.weight"] - 1.0
    torch.testing.assert_close(ema.ema_state_dict()["0.weight"], 0.5 * before + 0.5 * (before + 1.0))


def test_a_step_without_counted_samples_fails_before_the_weights_move():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.9, optimizer_rule="sgd")
    model(torch.randn(4, 3)).sum().backward()
    before = snapshot(model)
    with pytest.raises(
        RuntimeError, match=r"No samples were counted for this optimizer step: call `count_samples\(n\)`"
    ):
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    assert ema.optimizer_steps == 0
    with pytest.raises(RuntimeError, match=r"No samples were counted"):
        ema.end_step()


def test_momentum_attributes_follow_each_micro_batch_and_are_restored():
    model = tiny_model()
    model.center_momentum = 0.9
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, base_batch_size=4, momentum_attributes={"center_momentum": 0.9})
    seen = []
    for size in (8, 4, 2):
        ema.count_samples(size)
        seen.append(model.center_momentum)
    assert seen == pytest.approx([0.81, 0.9, 0.9**0.5])
    assert ema.metrics()["ema/center_momentum"] == pytest.approx(0.9**0.5)
    ema.detach()
    assert model.center_momentum == 0.9 and not optimizer._optimizer_step_pre_hooks


def test_swaps_and_functional_call_use_the_ema_and_restore_exactly():
    model = tiny_model().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = ScaledEMA(model, optimizer, momentum=0.5, base_batch_size=4)
    train(ema, model.train(), optimizer, [4, 4], accumulate=1)
    model.eval()
    raw = snapshot(model)
    x = torch.randn(5, 3)
    with ema.swapped():
        assert ema.is_swapped
        expected = model(x)
        assert torch.equal(model[0].weight, ema.ema_state_dict()["0.weight"])
        assert torch.equal(ema.raw_state_dict()["0.weight"], raw["0.weight"])  # raw values while swapped
    assert not ema.is_swapped and all(torch.equal(raw[k], v) for k, v in snapshot(model).items())
    torch.testing.assert_close(ema.functional_call(model, (x,)), expected)
    ema.swap_in()
    with pytest.raises(RuntimeError, match="The EMA weights are already swapped into the model"):
        ema.swap_in()
    ema.swap_out()
    ema.swap_out()  # nothing to do twice
    assert torch.equal(model[0].weight, raw["0.weight"])
    with pytest.raises(
        ValueError,
        match=r"`module` must be the module this EMA averages \(the Sequential it was built with\), got another Linear",
    ):
        ema.functional_call(torch.nn.Linear(3, 1), (x,))


def test_teacher_mode_moves_the_teacher_and_keeps_no_copy():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"online": torch.nn.Linear(3, 2), "teacher": torch.nn.Linear(3, 2)})
    model["teacher"].requires_grad_(False)
    before = {k: v.clone() for k, v in model["teacher"].state_dict().items()}
    optimizer = torch.optim.SGD(model["online"].parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.9, base_batch_size=2, teachers={"online": "teacher"})
    model["online"](torch.randn(4, 3)).sum().backward()
    ema.count_samples(4)
    optimizer.step()
    for name, value in model["teacher"].state_dict().items():
        torch.testing.assert_close(value, 0.81 * before[name] + 0.19 * model["online"].state_dict()[name])
    assert "ema" not in ema.state_dict()
    with pytest.raises(RuntimeError, match=r"Teacher mode keeps no separate EMA: .*\['teacher'\]"):
        ema.ema_state_dict()


def test_state_dict_resumes_bit_identically_and_reset_starts_afresh():
    def run(micro_batches, state=None):
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ema = ScaledEMA(model, optimizer, momentum=0.8, base_batch_size=4, update_every=3, warmup=True)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            ema.load_state_dict(state["ema"])
        train(ema, model, optimizer, micro_batches, accumulate=1)
        return model, optimizer, ema

    full_model, _, full = run([4] * 5)
    half_model, half_optimizer, half = run([4] * 2)
    saved = {"model": half_model.state_dict(), "optimizer": half_optimizer.state_dict(), "ema": half.state_dict()}
    assert saved["ema"]["pending_decay"] < 1.0  # saved mid-window
    # the rest of the data, drawn again from the start of the same generator, differs: compare the clock only
    _, _, resumed = run([4] * 3, state=saved)
    assert (resumed.samples_seen, resumed.optimizer_steps, resumed.ema_updates) == (20, 5, 1)
    full.reset()
    assert (full.samples_seen, full.optimizer_steps, math.isnan(full.kappa)) == (0, 0, True)
    assert all(
        torch.equal(full.ema_state_dict()[k], v)
        for k, v in full_model.state_dict().items()
        if k != "1.num_batches_tracked"
    )


def test_load_state_dict_checks_everything_before_changing_anything():
    model = tiny_model()
    ema = ScaledEMA(model, momentum=0.9, base_batch_size=4)
    good = ema.state_dict()
    with pytest.raises(ValueError, match=r"The saved ScaledEMA state has format 7; this version of lightning-emascale"):
        ema.load_state_dict({**good, "format": 7})
    with pytest.raises(KeyError, match=r"The saved ScaledEMA state lacks \['samples_seen'\]"):
        ema.load_state_dict({k: v for k, v in good.items() if k != "samples_seen"})
    wrong = {**good, "samples_seen": 99, "optimizer_steps": 9, "ema": {**good["ema"], "0.weight": torch.zeros(5, 5)}}
    with pytest.raises(ValueError, match=r"The saved EMA of '0.weight' has shape \(5, 5\), the model's is \(4, 3\)"):
        ema.load_state_dict(wrong)
    assert ema.samples_seen == 0 and not torch.equal(ema.ema_state_dict()["0.bias"], torch.zeros(4))
    with pytest.raises(
        KeyError, match=r"lacks the 'ema' tensors this one needs, a Polyak EMA \(it was written in another mode\)"
    ):
        ema.load_state_dict({k: v for k, v in good.items() if k != "ema"})


def test_sample_clock_lr_reads_a_scaled_ema():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4)
    ema = ScaledEMA(model, optimizer, momentum=0.9, base_batch_size=4, total_samples=40)
    scheduler = SampleClockLR(optimizer, WarmupCosine(warmup=0.5), clock=ema)
    lrs = []
    for _ in range(5):
        model(torch.randn(8, 3)).sum().backward()
        ema.count_samples(8)
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.4 * WarmupCosine(warmup=0.5)(s / 40) for s in (8, 16, 24, 32, 40)])
    no_total = ScaledEMA(tiny_model(), momentum=0.9)
    with pytest.raises(ValueError, match=r"`total_samples` is not set: pass `total_samples=`"):
        _ = no_total.progress


def test_numpy_scalars_and_0d_tensors_are_numbers_bools_are_not():
    model = tiny_model()
    ema = ScaledEMA(
        model, momentum=np.float32(0.5), base_batch_size=np.int64(4), update_every=torch.tensor(1),
        total_samples=torch.tensor(100),
    )  # fmt: skip
    assert (ema.options.momentum, ema.options.base_batch_size, ema.options.update_every) == (0.5, 4, 1)
    assert type(ema.options.base_batch_size) is int and type(ema.options.momentum) is float
    ema.count_samples(np.int32(4))
    ema.count_samples(torch.tensor(4))
    ema.end_step()
    assert ema.kappa == 2.0
    with pytest.raises(
        ValueError, match=r"`samples` must be a positive integer \(the micro-batch's global size\), got True"
    ):
        ema.count_samples(True)
    with pytest.raises(ValueError, match=r"`samples` must be a positive integer .*, got 2.5"):
        ema.count_samples(2.5)
    with pytest.raises(TypeError, match=r"`momentum` must be a real number in \[0, 1\), got True"):
        ScaledEMA(model, momentum=True)
    with pytest.raises(ValueError, match=r"`base_batch_size` must be a positive integer or None, got True"):
        ScaledEMA(model, base_batch_size=True)
    with pytest.raises(ValueError, match=r"`base_batch_size` must be a positive integer or None, got tensor\(4.\)"):
        ScaledEMA(model, base_batch_size=torch.tensor(4.0))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"momentum": 1.0}, ValueError, r"`momentum` must be in \[0, 1\), got 1.0"),
        ({"update_every": 0}, ValueError, r"`update_every` must be a positive integer, got 0"),
        ({"optimizer_rule": "lamb"}, ValueError, r"`optimizer_rule` must be one of \['adam', 'none', 'sgd'\]"),
        ({"ema_precision": "fp8"}, ValueError, r"`ema_precision` must be one of \['fp32', 'model'\], got 'fp8'"),
        ({"warmup": 1}, ValueError, r"`warmup` must be True, False or one of \['ratio', 'inverse-power'\], got 1"),
        ({"auto_end_step": "yes"}, ValueError, r"`auto_end_step` must be True or False, got 'yes'"),
        ({"momentum_schedule": lambda p: 1.5}, ValueError, r"`momentum_schedule\(0.0\)` must be in \[0, 1\], got 1.5"),
        (
            {"momentum_schedule": lambda p: 0.5, "final_momentum": 0.9},
            ValueError,
            r"`final_momentum`=0.9 has no effect with a callable `momentum_schedule`",
        ),
        ({"teachers": {"0": "missing"}}, ValueError, r"`teachers` names 'missing', which is not a submodule"),
        (
            {"momentum_attributes": {"x": 0.9}, "base_batch_size": 4},
            ValueError,
            r"names 'x', which Sequential does not",
        ),
        (
            {"optimizer_rule": "adam"},
            ValueError,
            r"`optimizer_rule`=AdamScalingRule\(\) does not fit optimizer 0 \(SGD\)",
        ),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, error, match):
    model = tiny_model()
    with pytest.raises(error, match=match):
        ScaledEMA(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_only_torch_modules_and_optimizers():
    with pytest.raises(TypeError, match=r"`module` must be a torch.nn.Module, got dict"):
        ScaledEMA({}, momentum=0.9)
    with pytest.raises(TypeError, match=r"`optimizers` must be torch optimizers, got str"):
        ScaledEMA(tiny_model(), "sgd", momentum=0.9)


def test_a_skipped_step_is_ended_by_hand_and_does_not_inflate_the_next_kappa():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.9, base_batch_size=4, optimizer_rule="sgd")
    ema.count_samples(4)  # a grad scaler found inf: optimizer.step() never ran, so no hook ended the step
    ema.end_step()
    assert (ema.optimizer_steps, ema.samples_seen, ema.kappa) == (1, 4, 1.0)
    model(torch.randn(4, 3)).sum().backward()
    ema.count_samples(4)
    optimizer.step()
    assert (ema.optimizer_steps, ema.samples_seen, ema.kappa, ema.step_lrs) == (2, 8, 1.0, [[0.1]])
    ema.end_step()  # after a step the hook ended: nothing to do
    assert (ema.optimizer_steps, ema.ema_updates) == (2, 2)


def test_a_step_that_raises_leaves_a_newer_scheduler_value_in_place():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.9, base_batch_size=4, optimizer_rule="sgd")

    def failing_closure():
        raise RuntimeError("nan loss")

    ema.count_samples(8)
    with pytest.raises(RuntimeError, match="nan loss"):
        optimizer.step(failing_closure)  # the pre-hook scaled the LR to 0.2, no post-hook restores it
    optimizer.param_groups[0]["lr"] = 0.05  # a scheduler steps meanwhile
    model(torch.randn(8, 3)).sum().backward()
    optimizer.step()
    assert ema.step_lrs == [[0.1]] and optimizer.param_groups[0]["lr"] == 0.05  # 0.05 x kappa 2, then restored


def test_a_0d_tensor_buffer_is_a_momentum_attribute_too():
    model = tiny_model()
    model.register_buffer("center_momentum", torch.tensor(0.9, dtype=torch.float64))
    ema = ScaledEMA(model, base_batch_size=4, momentum_attributes={"center_momentum": 0.9})
    ema.count_samples(8)
    assert model.center_momentum.item() == pytest.approx(0.81)
    ema.detach()
    assert model.center_momentum.item() == 0.9 and isinstance(model.center_momentum, torch.Tensor)


def test_training_while_swapped_and_a_rule_without_optimizers_are_errors():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=0.9, base_batch_size=4)
    model(torch.randn(4, 3)).sum().backward()
    ema.count_samples(4)
    with ema.swapped():
        before = snapshot(model)
        with pytest.raises(RuntimeError, match=r"optimizer.step\(\) while the EMA weights are swapped into the module"):
            optimizer.step()
        assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    with pytest.raises(ValueError, match=r"`optimizer_rule`=SGDScalingRule\(\) scales the optimizers' steps, but no"):
        ScaledEMA(model, momentum=0.9, optimizer_rule="sgd")


def test_a_failed_attach_leaves_the_hooks_in_place():
    model = tiny_model()
    model.criterion = SimpleNamespace(center_momentum=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, base_batch_size=4, momentum_attributes={"criterion.center_momentum": 0.9})
    criterion = model.criterion
    del model.criterion
    with pytest.raises(ValueError, match=r"names 'criterion.center_momentum', which Sequential does not have"):
        ema.attach(optimizer)
    model.criterion = criterion
    model(torch.randn(4, 3)).sum().backward()
    ema.count_samples(4)
    optimizer.step()
    assert ema.optimizer_steps == 1  # still hooked


def test_overriding_momentum_at_on_the_core_fails_loudly():
    class Shaped(ScaledEMA):
        def momentum_at(self, progress: float) -> float:
            return 0.5

    with pytest.raises(TypeError, match=r"Shaped overrides `momentum_at`, which does not shape the schedule"):
        Shaped(tiny_model(), momentum=0.9)


def test_saved_states_are_checked_value_by_value_and_mode_by_mode():
    model = tiny_model()
    ema = ScaledEMA(model, momentum=0.9, base_batch_size=4)
    good = ema.state_dict()
    for key, value, allowed in [
        ("samples_seen", -5, r"an integer >= 0 and at most 9007199254740992"),
        ("samples_seen", 10**30, r"an integer >= 0 and at most 9007199254740992"),
        ("ema_updates", 1.5, r"an integer >= 0 and at most 9007199254740992"),
        ("pending_decay", 3.0, r"a number in \[0, 1\]"),
        ("pending_decay", float("nan"), r"a number in \[0, 1\]"),
        ("pending_decay", -0.5, r"a number in \[0, 1\]"),
        ("debias_weight", 1.5, r"a number in \[0, 1\]"),
        ("switches", -1, r"an integer >= 0 and at most 9007199254740992"),
        ("base_batch_size", 0, r"a positive integer or None"),
    ]:
        shown = "1e\\+30 \\(an integer of 31 digits\\)" if value == 10**30 else re.escape(repr(value))
        with pytest.raises(ValueError, match=rf"The saved ScaledEMA state has {key}={shown}; {allowed} is allowed"):
            ema.load_state_dict({**good, key: value})
    poisoned = {**good["ema"], "0.bias": torch.full((4,), float("nan"))}
    with pytest.raises(ValueError, match=r"has a non-finite EMA of '0.bias' \(NaN\); the checkpoint is corrupt"):
        ema.load_state_dict({**good, "ema": poisoned})
    assert torch.isfinite(ema.ema_state_dict()["0.bias"]).all() and ema.samples_seen == 0
    teacher = torch.nn.ModuleDict({"online": torch.nn.Linear(3, 2), "teacher": torch.nn.Linear(3, 2)})
    teacher["teacher"].requires_grad_(False)
    with pytest.raises(KeyError, match=r"holds the 'ema' tensors of a Polyak EMA, but this one is in teacher mode"):
        ScaledEMA(teacher, momentum=0.9, teachers={"online": "teacher"}).load_state_dict(good)


def test_wiring_is_fixed_when_built():
    ema = ScaledEMA(tiny_model(), momentum=0.9)
    with pytest.raises(AttributeError):
        ema.auto_end_step = False  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"`total_samples_from` must be a callable that returns the total, got 5"):
        ScaledEMA(tiny_model(), momentum=0.9, total_samples_from=5)  # type: ignore[arg-type]


def test_wrappers_are_unwrapped_so_names_are_the_modules_own():
    model = tiny_model()
    compiled = torch.compile(model)  # compiles lazily: nothing runs here
    ema = ScaledEMA(compiled, momentum=0.9)
    assert ema.module is model and set(ema.ema_state_dict()) == set(model.state_dict())
    x = torch.randn(2, 3)
    model.eval()
    torch.testing.assert_close(ema.functional_call(model, (x,)), model(x))  # the EMA equals the weights so far


def test_two_rules_on_one_optimizer_would_compound_and_are_refused():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = ScaledEMA(model, optimizer, momentum=0.9, optimizer_rule="sgd")
    with pytest.raises(
        ValueError, match=r"optimizer 0 \(SGD\) is already scaled by the rule of ScaledEMA\(a Polyak EMA"
    ):
        ScaledEMA(model, optimizer, momentum=0.99, optimizer_rule="sgd")
    ScaledEMA(model, optimizer, momentum=0.99)  # momentum only: fine
    first.detach()
    ScaledEMA(model, optimizer, momentum=0.99, optimizer_rule="sgd")  # the first one let go


def test_the_state_initializing_step_of_distributed_checkpoint_is_no_training_step():
    # torch.distributed.checkpoint steps an optimizer without state once, every lr set to 0, to create its state
    # (Lightning does it when resuming a ModelParallelStrategy fit): that step is neither scaled nor counted
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = ScaledEMA(model, optimizer, momentum=0.9, base_batch_size=4, optimizer_rule="sgd")
    state = get_optimizer_state_dict(model, optimizer)
    assert state["state"]  # the momentum buffers exist now
    assert (ema.optimizer_steps, ema.samples_seen, ema.ema_updates) == (0, 0, 0)
    assert optimizer.param_groups[0]["lr"] == 0.1
    ema.count_samples(8)  # and training goes on as before
    model(torch.randn(8, 3)).sum().backward()
    optimizer.step()
    assert (ema.optimizer_steps, ema.kappa) == (1, 2.0)
    # a training step with no samples counted still raises, also at lr 0 once the optimizer has state
    optimizer.param_groups[0]["lr"] = 0.0
    with pytest.raises(RuntimeError, match=r"No samples were counted for this optimizer step"):
        optimizer.step()
