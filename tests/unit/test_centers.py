"""CenterUpdate: DINO's teacher-output centre moved once per step, as one forward over the step's whole batch would,
driven directly (no Trainer) on lightly's own DINOLoss and Center."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from lightly.loss import DINOLoss
from lightly.models.modules.center import Center

from lightning_emascale._centers import CenterUpdate

DIM = 16
VIEWS = 2


class Holder(torch.nn.Module):
    """The module the owner resolves paths in (a LightningModule in practice)."""

    def __init__(self, criterion: torch.nn.Module) -> None:
        super().__init__()
        self.criterion = criterion


def dino(momentum: float = 0.9) -> DINOLoss:
    loss = DINOLoss(output_dim=DIM, center_momentum=momentum)
    loss.center.copy_(torch.randn(1, 1, DIM, generator=torch.Generator().manual_seed(7)))  # momentum matters
    return loss


def center(momentum: float = 0.9) -> Center:
    module = Center(size=(1, 1, DIM), momentum=momentum)
    module.center = torch.randn(1, 1, DIM, generator=torch.Generator().manual_seed(7))
    return module


def outputs(samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student outputs, (views, samples, dim) each."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VIEWS, samples, DIM, generator=generator), torch.randn(VIEWS, samples, DIM, generator=generator)


def forward(criterion: torch.nn.Module, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor | None:
    """One forward: DINOLoss returns its loss (and moves its centre), Center only moves its centre."""
    if isinstance(criterion, DINOLoss):
        return criterion(list(teacher), list(student))
    criterion.update(teacher)
    return None


def run_step(update: CenterUpdate, sizes: list[int], teacher: torch.Tensor, student: torch.Tensor, base: int):
    """One optimizer step of micro-batches of ``sizes`` through the attached criterion; returns their losses."""
    criterion = update.owner
    start = criterion.center.clone()
    losses, offset = [], 0
    for size in sizes:
        update.micro_batch(size)
        losses.append(forward(criterion, teacher[:, offset : offset + size], student[:, offset : offset + size]))
        assert torch.equal(criterion.center, start)  # every micro-batch sees the step's starting centre
        offset += size
    update.end_step(kappa=sum(sizes) / base)
    return losses


MAKERS = pytest.mark.parametrize("make", [dino, center], ids=["DINOLoss", "Center"])


# ------------------------------------------------------------------------------------------ (a) exactness
@MAKERS
@pytest.mark.parametrize(("sizes", "base"), [([8, 8, 8, 8], 32), ([8, 8, 8, 6], 30), ([8, 8, 8, 6], 32)])
def test_one_accumulated_step_equals_one_forward_over_the_whole_batch(make, sizes, base):
    total = sum(sizes)
    teacher, student = outputs(total)
    rho_hat = 0.9 ** (total / base)  # kappa = 1 where base == total: the plain loss's own momentum
    reference = make(momentum=rho_hat)
    start = reference.center.clone()
    reference_loss = forward(reference, teacher, student)

    holder = Holder(make(momentum=0.9))
    update = CenterUpdate.resolve(holder, "criterion", base_momentum=0.9)
    update.attach()
    losses = run_step(update, sizes, teacher, student, base)

    torch.testing.assert_close(holder.criterion.center, reference.center, rtol=0, atol=1e-6)
    assert update.last_momentum == pytest.approx(rho_hat, rel=1e-15)
    assert update.pending_samples == 0
    if make is dino:  # each micro-batch's loss is the plain loss's on it, at the step's starting centre
        offset = 0
        for size, loss in zip(sizes, losses):
            plain = make(momentum=0.9)
            plain.center.copy_(start)
            expected = forward(plain, teacher[:, offset : offset + size], student[:, offset : offset + size])
            torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
            offset += size
        weighted = sum(size * loss for size, loss in zip(sizes, losses)) / total
        torch.testing.assert_close(weighted, reference_loss, rtol=1e-6, atol=1e-6)


@MAKERS
def test_without_it_accumulation_misses_the_large_batch_centre(make):
    """The check above can fail: the plain criterion, even with its momentum scaled per micro-batch, does."""
    teacher, student = outputs(32)
    reference = make(momentum=0.9)
    forward(reference, teacher, student)
    plain = make(momentum=0.9**0.25)  # rho^(b/B) per micro-batch: the horizon is right, the values are not
    for offset in range(0, 32, 8):
        forward(plain, teacher[:, offset : offset + 8], student[:, offset : offset + 8])
    assert (plain.center - reference.center).abs().max() > 1e-4  # 100 x the tolerance above


# ------------------------------------------------------------------------------------------ (b) kappa
@MAKERS
def test_a_step_of_kappa_two_updates_once_at_rho_squared(make):
    teacher, student = outputs(32)
    holder = Holder(make())
    start = holder.criterion.center.clone()
    update = CenterUpdate.resolve(holder, "criterion", base_momentum=0.9)
    update.attach()
    run_step(update, [8, 8, 8, 8], teacher, student, base=16)
    expected = 0.81 * start + 0.19 * teacher.mean(dim=(0, 1), keepdim=True)
    torch.testing.assert_close(holder.criterion.center, expected, rtol=0, atol=1e-6)
    assert update.last_momentum == pytest.approx(0.81, rel=1e-15)


@MAKERS
def test_the_horizon_in_samples_matches_the_base_batch_run_on_a_constant_target(make):
    target = torch.linspace(-1, 1, DIM).expand(VIEWS, 32, DIM)  # every teacher output the same: centre -> target
    student = torch.zeros(VIEWS, 32, DIM)
    base_run = make()
    start = base_run.center.clone()
    for _ in range(10):  # 10 steps of the base batch, 16 samples, the plain criterion at 0.9
        forward(base_run, target[:, :16], student[:, :16])
    holder = Holder(make())
    update = CenterUpdate.resolve(holder, "criterion", base_momentum=0.9)
    update.attach()
    for _ in range(5):  # the same 160 samples in 5 steps of 32 (4 micro-batches of 8): kappa 2
        run_step(update, [8, 8, 8, 8], target, student, base=16)
    closed_form = target[:1, :1] + 0.9**10 * (start - target[:1, :1])
    torch.testing.assert_close(base_run.center, closed_form, rtol=0, atol=1e-6)
    torch.testing.assert_close(holder.criterion.center, closed_form, rtol=0, atol=1e-6)


def test_a_step_without_a_forward_leaves_the_centre_alone():
    holder = Holder(dino())
    start = holder.criterion.center.clone()
    update = CenterUpdate.resolve(holder, "criterion", base_momentum=0.9)
    update.attach()
    update.micro_batch(8)  # announced, never forwarded
    update.end_step(kappa=1.0)
    assert torch.equal(holder.criterion.center, start)
    assert update.last_momentum != update.last_momentum  # nan: no update yet


def test_two_calls_in_one_micro_batch_each_count_with_its_weight():
    teacher, _ = outputs(12)
    holder = Holder(center())
    start = holder.criterion.center.clone()
    update = CenterUpdate.resolve(holder, "criterion", base_momentum=0.9)
    update.attach()
    update.micro_batch(4)
    holder.criterion.update(teacher[:, :4])
    holder.criterion.update(teacher[:, 4:8])
    update.micro_batch(4)
    holder.criterion.update(teacher[:, 8:])
    assert update.pending_samples == 12
    update.end_step(kappa=1.0)
    expected = 0.9 * start + 0.1 * teacher.mean(dim=(0, 1), keepdim=True)
    torch.testing.assert_close(holder.criterion.center, expected, rtol=0, atol=1e-6)


@MAKERS
def test_in_eval_mode_the_method_runs_as_lightlys_own_outside_the_step(make):
    teacher, student = outputs(16)
    holder = Holder(make())
    reference = make()
    update = CenterUpdate.resolve(holder, "criterion", base_momentum=0.5)
    update.attach()
    update.micro_batch(8)
    forward(holder.criterion, teacher[:, :8], student[:, :8])  # training: pending
    holder.eval()  # validation in the middle of the step: no announcement needed, nothing added
    forward(holder.criterion, teacher[:, 8:], student[:, 8:])
    forward(reference, teacher[:, 8:], student[:, 8:])
    assert torch.equal(holder.criterion.center, reference.center) and update.pending_samples == 8
    holder.train()
    update.end_step(kappa=1.0)
    expected = 0.5 * reference.center + 0.5 * teacher[:, :8].mean(dim=(0, 1), keepdim=True)
    torch.testing.assert_close(holder.criterion.center, expected, rtol=0, atol=1e-6)


def test_a_tensor_momentum_is_zeroed_and_put_back():
    criterion = center()
    del criterion.momentum
    criterion.register_buffer("momentum", torch.tensor(0.5))  # a momentum kept as a 0-d buffer
    holder = Holder(criterion)
    momentum = criterion.momentum
    start = criterion.center.clone()
    update = CenterUpdate.resolve(holder, "criterion", base_momentum=0.9)
    update.attach()
    teacher, _ = outputs(8)
    update.micro_batch(8)
    criterion.update(teacher)
    assert criterion.momentum is momentum and momentum.item() == 0.5
    update.end_step(kappa=1.0)  # base_momentum, not the attribute, sets the update
    torch.testing.assert_close(criterion.center, 0.9 * start + 0.1 * teacher.mean(dim=(0, 1), keepdim=True))


# ------------------------------------------------------------------------------------------ (c) restore
@MAKERS
def test_restore_gives_the_original_method_back_and_the_criterion_works_as_before(make):
    holder = Holder(make())
    criterion = holder.criterion
    method = "update_center" if make is dino else "update"
    momentum_name = "center_momentum" if make is dino else "momentum"
    momentum, buffer = getattr(criterion, momentum_name), criterion.center
    update = CenterUpdate.resolve(holder, "criterion", base_momentum=0.9)
    update.attach()
    update.attach()  # attached already: nothing
    assert update.attached and method in vars(criterion)
    teacher, student = outputs(8)
    update.micro_batch(8)
    forward(criterion, teacher, student)  # pending, then dropped by restore
    update.restore()
    update.restore()  # detached already: nothing
    assert not update.attached and method not in vars(criterion)
    assert getattr(criterion, method).__func__ is getattr(type(criterion), method)
    assert getattr(criterion, momentum_name) is momentum and criterion.center is buffer
    assert "center" in criterion._buffers
    update.end_step(kappa=1.0)  # nothing pending after restore
    reference = make()
    assert torch.equal(criterion.center, reference.center)
    forward(criterion, teacher, student)
    forward(reference, teacher, student)
    assert torch.equal(criterion.center, reference.center)  # the plain lightly update again
    assert not torch.equal(criterion.center, make().center)


def test_restore_puts_back_what_the_instance_held_before():
    criterion = dino()
    calls = []

    def own(teacher_out):
        calls.append(teacher_out.shape)

    criterion.update_center = own
    holder = Holder(criterion)
    update = CenterUpdate.resolve(holder, "criterion", base_momentum=0.9)
    update.attach()
    teacher, student = outputs(4)
    update.micro_batch(4)
    forward(criterion, teacher, student)
    assert calls == [(VIEWS, 4, DIM)]  # the instance's own method ran inside the interception
    update.restore()
    assert vars(criterion)["update_center"] is own


def test_an_error_inside_the_method_leaves_momentum_centre_and_sum_as_they_were():
    holder = Holder(center())
    criterion = holder.criterion
    start = criterion.center
    update = CenterUpdate.resolve(holder, "criterion", base_momentum=0.9)
    update.attach()
    update.micro_batch(4)
    with pytest.raises(TypeError):
        criterion.update("not a tensor")  # raised by torch inside lightly's center_mean
    assert criterion.momentum == 0.9 and criterion.center is start and update.pending_samples == 0


def test_an_attached_module_can_be_copied_and_pickled():
    holder = Holder(dino())
    update = CenterUpdate.resolve(holder, "criterion", base_momentum=0.9)
    update.attach()
    teacher, student = outputs(8)
    for clone in (copy.deepcopy(holder), pickle.loads(pickle.dumps(holder))):
        start = clone.criterion.center.clone()
        clone_update = vars(clone.criterion)["update_center"].update
        assert clone_update is not update and clone_update.owner is clone.criterion
        clone_update.micro_batch(8)
        forward(clone.criterion, teacher, student)
        assert torch.equal(clone.criterion.center, start) and clone_update.pending_samples == 8
        clone_update.restore()
        assert "update_center" not in vars(clone.criterion)
    assert update.pending_samples == 0  # the copies drove their own


# ------------------------------------------------------------------------------------------ (d) errors
class ReadOnly(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(1, 1, DIM))

    @property
    def momentum(self) -> float:
        return 0.9

    def update(self, x: torch.Tensor) -> None:
        pass


def with_attribute(name, value):
    loss = DINOLoss(output_dim=DIM)
    setattr(loss, name, value)
    return loss


NEEDS = (
    r"a DINO centre needs a method `update_center`, a floating-point tensor `center` and a number"
    r" `center_momentum` \(lightly's DINOLoss\) or a method `update`, a floating-point tensor `center` and a number"
    r" `momentum` \(lightly's Center\)$"
)


@pytest.mark.parametrize(
    ("criterion", "path", "match"),
    [
        (dino(), "criterion.nope", r"^`center_momenta` names 'criterion.nope', which Holder does not have \(DINOLoss"
         r" has no attribute 'nope'\)$"),
        (dino(), "head.0", r"^`center_momenta` names 'head.0', which Holder does not have \(Holder has no attribute"
         r" 'head'\)$"),
        (torch.nn.Linear(2, 2), "criterion", r"^`center_momenta` names 'criterion', a Linear with no method"
         r" `update_center`, no tensor `center`, no `center_momentum`: " + NEEDS),
        (with_attribute("center", torch.zeros(1, 1, DIM, dtype=torch.int64)), "criterion", r"^`center_momenta` names"
         r" 'criterion', a DINOLoss with a torch.int64 `center`, not floating-point: " + NEEDS),
        (with_attribute("center_momentum", "0.9"), "criterion", r"^`center_momenta` names 'criterion', a DINOLoss"
         r" with `center_momentum` = '0.9', not a number: " + NEEDS),
        (with_attribute("center_momentum", True), "criterion", r"`center_momentum` = True, not a number"),
        (ReadOnly(), "criterion", r"^`center_momenta` names 'criterion', a ReadOnly with `momentum`, a read-only"
         r" property \(no setter\): " + NEEDS),
        (dino(), "", r"^`center_momenta` names '', a Holder with no method `update_center`, no tensor `center`, no"
         r" `center_momentum`: "),
    ],
)  # fmt: skip
def test_resolve_refuses_what_is_not_a_centre(criterion, path, match):
    with pytest.raises(ValueError, match=match):
        CenterUpdate.resolve(Holder(criterion), path, base_momentum=0.9)


def test_resolve_takes_the_module_itself_at_the_empty_path():
    loss = dino()
    assert CenterUpdate.resolve(loss, "", 0.9).owner is loss


@pytest.mark.parametrize(
    ("momentum", "error", "match"),
    [
        (1.0, ValueError, r"^`center_momenta\['criterion'\]` must be in \[0, 1\), got 1.0$"),
        (-0.1, ValueError, r"^`center_momenta\['criterion'\]` must be in \[0, 1\), got -0.1$"),
        ("0.9", TypeError, r"^`center_momenta\['criterion'\]` must be a real number in \[0, 1\), got '0.9'$"),
    ],
)
def test_resolve_refuses_a_base_momentum_outside_zero_one(momentum, error, match):
    with pytest.raises(error, match=match):
        CenterUpdate.resolve(Holder(dino()), "criterion", base_momentum=momentum)


def test_two_paths_to_one_centre_are_refused_and_nothing_changes():
    holder = Holder(dino())
    holder.alias = holder.criterion
    first = CenterUpdate.resolve(holder, "criterion", 0.9)
    first.attach()
    intercept = vars(holder.criterion)["update_center"]
    second = CenterUpdate.resolve(holder, "alias", 0.9)
    match = (
        r"^`center_momenta` names 'alias', the same DINOLoss as 'criterion', whose `update_center` is intercepted"
        r" already: name each centre once$"
    )
    with pytest.raises(ValueError, match=match):
        second.attach()
    assert not second.attached and vars(holder.criterion)["update_center"] is intercept


@pytest.mark.parametrize(
    ("samples", "match"),
    [
        (0, r"^`samples` must be a positive integer \(the micro-batch's global size\), got 0$"),
        (2.5, r"^`samples` must be a positive integer \(the micro-batch's global size\), got 2.5$"),
        (True, r"^`samples` must be a positive integer \(the micro-batch's global size\), got True$"),
    ],
)
def test_micro_batch_refuses_a_size_that_is_no_count(samples, match):
    update = CenterUpdate.resolve(Holder(dino()), "criterion", 0.9)
    with pytest.raises(ValueError, match=match):
        update.micro_batch(samples)


@pytest.mark.parametrize(
    ("kappa", "error", "match"),
    [
        (0, ValueError, r"^`kappa` must be a positive finite number, got 0.0$"),
        (float("inf"), ValueError, r"^`kappa` must be a positive finite number, got inf$"),
        (None, TypeError, r"^`kappa` must be a positive real number, got None$"),
    ],
)
def test_end_step_refuses_a_bad_kappa_and_keeps_the_step(kappa, error, match):
    holder = Holder(dino())
    update = CenterUpdate.resolve(holder, "criterion", 0.9)
    update.attach()
    update.micro_batch(8)
    forward(holder.criterion, *outputs(8))
    start = holder.criterion.center.clone()
    with pytest.raises(error, match=match):
        update.end_step(kappa)
    assert update.pending_samples == 8 and torch.equal(holder.criterion.center, start)


def test_a_forward_with_no_micro_batch_announced_is_refused():
    holder = Holder(dino())
    update = CenterUpdate.resolve(holder, "criterion", 0.9)
    update.attach()
    match = (
        r"^DINOLoss.update_center of 'criterion' ran in training mode with no micro-batch announced: call"
        r" `micro_batch\(samples\)` \(`ScaledEMA.count_samples` does\) before each training forward, not after it$"
    )
    with pytest.raises(RuntimeError, match=match):
        forward(holder.criterion, *outputs(8))
    update.micro_batch(8)
    forward(holder.criterion, *outputs(8))
    update.end_step(1.0)  # the announcement ends with the step
    with pytest.raises(RuntimeError, match=match):
        forward(holder.criterion, *outputs(8))


def test_a_micro_batch_centre_of_another_shape_is_refused_and_nothing_changes():
    holder = Holder(center())
    start = holder.criterion.center
    update = CenterUpdate.resolve(holder, "criterion", 0.9)
    update.attach()
    update.micro_batch(8)
    match = (
        r"^Center.update of 'criterion' computed a micro-batch centre of shape \(1, 1, 1, 16\) for a centre of shape"
        r" \(1, 1, 16\): give it outputs whose centre has the centre's shape$"
    )
    with pytest.raises(ValueError, match=match):
        holder.criterion.update(torch.randn(VIEWS, 8, 1, DIM))  # lightly would broadcast the centre to 4 dimensions
    assert holder.criterion.center is start and holder.criterion.momentum == 0.9 and update.pending_samples == 0
