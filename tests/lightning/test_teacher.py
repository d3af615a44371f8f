"""Teacher mode: EMAScalingCallback drives a module's own teacher (BYOL, DINO) and other momenta."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from helpers import PAIRS, TinyBYOL, make_trainer

from lightning_emascale import EMAScalingCallback, cosine_schedule


def teacher_params(model):
    return {
        f"{t}.{n}": p.detach().clone() for t in PAIRS.values() for n, p in model.get_submodule(t).named_parameters()
    }


def online_params(model):
    return {f"{PAIRS[o]}.{n}": p.detach().clone() for o in PAIRS for n, p in model.get_submodule(o).named_parameters()}


class TeacherSpy(L.Callback):
    """After every optimizer step: teacher == rho-hat * teacher_before + (1 - rho-hat) * online; else unchanged."""

    def __init__(self, ema: EMAScalingCallback) -> None:
        self.ema = ema
        self.checked_steps = 0
        self.unchanged_micro_batches = 0
        self.momenta: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step
        self.before = teacher_params(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = teacher_params(pl_module)
        if trainer.global_step == self.step:
            assert all(torch.equal(after[k], v) for k, v in self.before.items())
            self.unchanged_micro_batches += 1
            return
        rho = self.ema.ema_momentum
        online = online_params(pl_module)
        for name, before in self.before.items():
            expected = rho * before + (1 - rho) * online[name]
            torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-7, msg=name)
        self.momenta.append((self.ema.samples_seen - self.ema.scaled_ema.global_batch_size, rho))
        self.checked_steps += 1


def test_teacher_follows_the_student_once_per_optimizer_step_with_the_scheduled_rho_hat():
    L.seed_everything(0)
    model = TinyBYOL(n_samples=32, batch_size=4)
    ema = EMAScalingCallback(
        momentum=0.9, base_batch_size=4, teachers=PAIRS, momentum_schedule="cosine", final_momentum=1.0
    )
    spy = TeacherSpy(ema)
    make_trainer([ema, spy], max_epochs=2, accumulate_grad_batches=2).fit(model)
    assert ema.evaluate_with_ema is False
    assert spy.checked_steps == 8 and spy.unchanged_micro_batches == 8
    # kappa 2 (2 micro-batches of 4 against base 4); the cosine is evaluated at samples before each step / 64
    expected = [(s, cosine_schedule(s / 64, 0.9, 1.0) ** 2) for s in range(0, 64, 8)]
    assert [s for s, _ in spy.momenta] == [s for s, _ in expected]
    assert [m for _, m in spy.momenta] == pytest.approx([m for _, m in expected], rel=1e-12)
    # the predictor has no twin and the teachers are not optimized: only the EMA moved them
    assert not any(p.requires_grad for t in PAIRS.values() for p in model.get_submodule(t).parameters())


def test_teacher_buffers_are_left_to_the_teachers_forward():
    L.seed_everything(0)
    model = TinyBYOL()
    before = model.backbone_momentum[1].running_mean.clone()
    make_trainer([EMAScalingCallback(momentum=0.9, teachers=PAIRS)], max_epochs=1).fit(model)
    # BatchNorm statistics of the teacher come from its own forward passes, as with lightly's update_momentum
    assert not torch.equal(model.backbone_momentum[1].running_mean, before)
    assert not torch.equal(model.backbone_momentum[1].running_mean, model.backbone[1].running_mean)


def test_dino_center_momentum_is_scaled_per_micro_batch_and_restored():
    L.seed_everything(0)
    model = TinyBYOL(n_samples=20, batch_size=8)  # micro-batches 8, 8, 4
    ema = EMAScalingCallback(
        momentum=0.99, base_batch_size=4, teachers=PAIRS, momentum_attributes={"criterion.center_momentum": 0.9}
    )
    assert ema.momentum_attribute_values() == {}  # before fit
    values = []
    record = L.pytorch.callbacks.LambdaCallback(
        on_train_batch_end=lambda *_: values.append(ema.momentum_attribute_values())
    )
    trainer = make_trainer([ema, record], max_epochs=1)
    trainer.fit(model)
    assert model.criterion.seen == pytest.approx([0.9**2, 0.9**2, 0.9**1])
    assert values == [{"criterion.center_momentum": pytest.approx(0.9**k)} for k in (2, 2, 1)]  # each step's
    assert model.criterion.center_momentum == 0.9  # the module is left as it was
    assert trainer.callback_metrics["ema/criterion.center_momentum"] == pytest.approx(0.9)


def test_polyak_ema_and_teacher_side_by_side():
    L.seed_everything(0)
    model = TinyBYOL()
    teacher = EMAScalingCallback(momentum=0.9, teachers=PAIRS, name="teacher")
    polyak = EMAScalingCallback(momentum=0.99, name="polyak")
    make_trainer([teacher, polyak], max_epochs=1).fit(model)
    assert polyak.evaluate_with_ema and not teacher.evaluate_with_ema
    assert "backbone_momentum.0.weight" in polyak.ema_state_dict()  # the Polyak EMA covers the whole module
    with pytest.raises(RuntimeError, match=r"Teacher mode keeps no separate EMA: .*\['backbone_momentum', 'head_mo"):
        teacher.ema_state_dict()


def test_teacher_mode_resumes_bit_identically(tmp_path):
    def run(max_epochs, ckpt_path=None):
        L.seed_everything(0)
        model = TinyBYOL()
        # the interrupted run must plan for the same 2 epochs: its schedule runs on 64 samples too
        ema = EMAScalingCallback(
            momentum=0.9, teachers=PAIRS, momentum_schedule="cosine", final_momentum=1.0, total_samples=64
        )
        trainer = make_trainer([ema], max_epochs=max_epochs)
        trainer.fit(model, ckpt_path=ckpt_path)
        return trainer, model, ema

    trainer, _, ema = run(1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    state = torch.load(tmp_path / "half.ckpt", weights_only=False)["callbacks"][ema.state_key]
    assert "ema" not in state and state["samples_seen"] == 32
    _, full, _ = run(2)
    _, resumed, resumed_ema = run(2, ckpt_path=tmp_path / "half.ckpt")
    assert resumed_ema.samples_seen == 64
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


class Unfrozen(TinyBYOL):
    def __init__(self):
        super().__init__()
        self.head_momentum.requires_grad_(True)


class Mismatched(TinyBYOL):
    def __init__(self):
        super().__init__()
        self.head_momentum = torch.nn.Linear(8, 5).requires_grad_(False)


class Renamed(TinyBYOL):
    def __init__(self):
        super().__init__()
        self.head_momentum = torch.nn.Sequential(torch.nn.Linear(8, 4)).requires_grad_(False)


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (
            TinyBYOL,
            {"teachers": {"backbone": "target_backbone"}},
            r"`teachers` names 'target_backbone', which is not a submodule of TinyBYOL; its children are"
            r" \['backbone', 'head', 'predictor', 'backbone_momentum', 'head_momentum'\]",
        ),
        (
            Unfrozen,
            {"teachers": PAIRS},
            r"Teacher 'head_momentum' still requires grad \(head_momentum.weight, head_momentum.bias, ...\): freeze"
            r" it with `self.head_momentum.requires_grad_\(False\)`",
        ),
        (
            Mismatched,
            {"teachers": PAIRS},
            r"Teacher 'head_momentum' does not mirror 'head': `weight` has shape \(5, 8\) in the teacher and \(4, 8\)",
        ),
        (
            Renamed,
            {"teachers": PAIRS},
            r"Teacher 'head_momentum' does not mirror 'head': parameters \['0.bias', '0.weight', 'bias', 'weight'\]",
        ),
        (
            TinyBYOL,
            {"teachers": PAIRS, "base_batch_size": 4, "momentum_attributes": {"criterion.momentum": 0.9}},
            r"`momentum_attributes` names 'criterion.momentum', which TinyBYOL does not have",
        ),
        (
            TinyBYOL,
            {"teachers": PAIRS, "base_batch_size": 4, "momentum_attributes": {"criterion.seen": 0.9}},
            r"`momentum_attributes` names 'criterion.seen', which holds \[\], not a number",
        ),
    ],
)
def test_teacher_errors_at_fit_start(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_trainer([EMAScalingCallback(momentum=0.9, **kwargs)], max_epochs=1).fit(model())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teachers": {}}, r"`teachers` must be a non-empty dict of attribute paths, got \{\}"),
        (
            {"teachers": {"backbone": 3}},
            r"`teachers` must map attribute paths \(strings\) to strings, got 'backbone': 3",
        ),
        (
            {"teachers": PAIRS, "evaluate_with_ema": True},
            r"`evaluate_with_ema=True` needs a separate EMA copy to swap in, and teacher mode",
        ),
        (
            {"momentum_attributes": {"criterion.center_momentum": 0.9}},
            r"`momentum_attributes` are scaled per micro-batch .* need `base_batch_size`",
        ),
        (
            {"base_batch_size": 4, "momentum_attributes": {"criterion.center_momentum": "0.9"}},
            r"`momentum_attributes` must map attribute paths \(strings\) to numbers, got 'criterion.center_momentum'",
        ),
        (
            {"base_batch_size": 4, "momentum_attributes": {"c.m": 1.0}},
            r"`momentum_attributes\['c.m'\]` must be in \[0, 1\), got 1.0",
        ),
    ],
)
def test_teacher_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMAScalingCallback(momentum=0.9, **kwargs)


def test_teacher_with_update_every_moves_every_other_step_with_the_product_of_momenta():
    L.seed_everything(0)
    model = TinyBYOL(n_samples=16, batch_size=4)
    ema = EMAScalingCallback(momentum=0.9, base_batch_size=2, teachers=PAIRS, update_every=2)
    moves = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = teacher_params(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = teacher_params(pl_module)
            moves.append(not all(torch.equal(after[k], v) for k, v in self.before.items()))
            if moves[-1]:  # both steps of the window at rho = 0.9^2: one update at 0.9^4 toward the student
                online = online_params(pl_module)
                for name, before in self.first.items():
                    torch.testing.assert_close(after[name], 0.9**4 * before + (1 - 0.9**4) * online[name])
            else:
                self.first = self.before

    make_trainer([ema, Spy()], max_epochs=1).fit(model)
    assert moves == [False, True, False, True]


def test_an_exception_in_fit_restores_the_attributes_and_the_next_fit_counts_afresh():
    class Boom(TinyBYOL):
        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == 1 and batch_idx % 2 == 1:
                raise RuntimeError("boom")  # the second micro-batch of step 2: its first one is counted already
            return super().training_step(batch, batch_idx)

    model = Boom(n_samples=32, batch_size=4)
    ema = EMAScalingCallback(
        momentum=0.9, base_batch_size=8, teachers=PAIRS, momentum_attributes={"criterion.center_momentum": 0.9}
    )
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer([ema], max_epochs=1, accumulate_grad_batches=2).fit(model)
    assert model.criterion.center_momentum == 0.9  # not left at 0.9 ** (4 / 8)
    model.training_step = super(Boom, model).training_step.__get__(model)  # no more exceptions
    kappas = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            kappas.append(ema.kappa)

    make_trainer([ema, Spy()], max_epochs=1, accumulate_grad_batches=2).fit(model)
    assert kappas[1::2] == [1.0] * 4  # 2 x 4 = 8 = base: the interrupted step's samples were dropped


# ------------------------------------------------------------------------------------- teachers that change
def test_freeze_teachers_makes_a_trainable_teacher_a_drop_in():
    model = TinyBYOL()
    model.backbone_momentum.requires_grad_(True)  # as lightly's I-JEPA leaves its target encoder
    with pytest.raises(ValueError, match="freeze_teachers=True"):
        make_trainer([EMAScalingCallback(momentum=0.9, teachers=PAIRS)]).fit(model)
    callback = EMAScalingCallback(momentum=0.9, teachers=PAIRS, freeze_teachers=True)
    make_trainer([callback]).fit(model)
    assert not any(p.requires_grad for p in model.backbone_momentum.parameters())
    assert callback.ema_updates == 8


def test_a_teacher_replaced_at_its_path_is_followed():
    class Replacing(TinyBYOL):  # lightly's SMoG replaces its teachers with deep copies now and then
        def on_train_batch_start(self, batch, batch_idx):
            if batch_idx == 4:
                self.backbone_momentum = copy.deepcopy(self.backbone_momentum)
                self.replaced = self.backbone_momentum[0].weight.detach().clone()

    model = Replacing()
    callback = EMAScalingCallback(momentum=0.5, teachers=PAIRS)
    make_trainer([callback]).fit(model)
    # 4 updates after the replacement: the live teacher moved (it stayed frozen before, the orphan moving instead)
    assert not torch.equal(model.backbone_momentum[0].weight, model.replaced)
    expected = model.replaced.clone()
    assert (model.backbone_momentum[0].weight - model.backbone[0].weight).abs().max() < (
        expected - model.backbone[0].weight
    ).abs().max()
