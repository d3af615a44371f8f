"""The options users rely on in the other EMA tools, on the sample clock: a delayed start, the warm-up formulas by
name with a floor, a debiased EMA, switch EMA and ``copy_to``; each against a reference written out here, and every
message they raise."""

from __future__ import annotations

import pytest
import torch

from lightning_emascale import ScaledEMA, inverse_power_warmup

MOMENTUM = 0.9


def new_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def run(sizes, **options):
    """A plain loop over micro-batches of ``sizes`` (one per step); yields (ema, model, samples before the step)."""
    model = new_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, base_batch_size=4, **options)
    generator = torch.Generator().manual_seed(3)
    for size in sizes:
        x = torch.randn(size, 3, generator=generator)
        model(x).pow(2).mean().backward()
        before = ema.samples_seen
        ema.count_samples(size)
        optimizer.step()
        optimizer.zero_grad()
        yield ema, model, before


def last(rows):
    """The last row of a run, after all of its steps."""
    *_, final = rows
    return final


def weights(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


SIZES = [4, 8, 4, 2, 16, 4, 4, 8, 4, 12]


def test_a_delayed_start_copies_the_weights_until_the_steps_start_past_it():
    for ema, model, before in run(SIZES, momentum=MOMENTUM, start_after_samples=16):
        copied = all(torch.equal(ema.ema_state_dict()[k], v) for k, v in weights(model).items())
        assert copied == (before <= 16), before
        assert (ema.ema_momentum == 0.0) == (before <= 16)
        if before > 16:
            assert ema.ema_momentum == pytest.approx(MOMENTUM ** (ema.kappa), rel=1e-15)


@pytest.mark.parametrize("warmup, formula", [
    ("ratio", lambda t: (1 + t) / (10 + t)),
    ("inverse-power", lambda t: inverse_power_warmup(t, 2.0, 0.75)),
])  # fmt: skip
def test_the_warm_ups_count_base_batches_from_the_start_and_the_floor_holds(warmup, formula):
    shape = {"warmup_gamma": 2.0, "warmup_power": 0.75} if warmup == "inverse-power" else {}
    rows = run(SIZES, momentum=0.99, warmup=warmup, start_after_samples=8, min_momentum=0.3, **shape)
    for ema, _, before in rows:
        if before <= 8:
            assert ema.ema_momentum == 0.0
            continue
        t = (before - 8) / 4
        expected = max(min(0.99, formula(t)), 0.3) ** ema.kappa
        assert ema.ema_momentum == pytest.approx(expected, rel=1e-14), before


@pytest.mark.parametrize("update_every", [1, 3])
def test_debias_equals_a_zero_initialised_ema_divided_by_its_total_weight(update_every):
    """Adam's bias correction: z <- ρz + (1 - ρ)θ from z = 0, read as z / (1 - Πρ); here with a different batch at
    every step (ρ̂ = ρ^κ) and updates every ``update_every`` steps (ρ of an update = the product of its steps')."""
    zero: dict[str, torch.Tensor] = {}
    product, decay, last = 1.0, 1.0, 1.0
    for ema, model, _ in run(SIZES, momentum=MOMENTUM, debias=True, update_every=update_every):
        decay *= ema.ema_momentum
        if ema.optimizer_steps % update_every:
            continue
        for name, value in weights(model).items():
            zero[name] = (
                decay * zero.get(name, torch.zeros_like(value, dtype=torch.float64)) + (1 - decay) * value.double()
            )
        product *= decay
        last, decay = decay, 1.0
        for name, value in zero.items():
            torch.testing.assert_close(ema.ema_state_dict()[name].double(), value / (1 - product), rtol=1e-6, atol=1e-7)
    assert ema.momentum_per_update < last  # the momentum applied, and logged, is the debiased one, below ρ̂


def test_switch_ema_writes_the_ema_into_the_model_after_each_multiple_it_starts_past():
    switched = []
    for ema, model, before in run(SIZES, momentum=MOMENTUM, switch_every_samples=12, switch_momentum=0.0):
        equal = all(torch.equal(ema.ema_state_dict()[k], v) for k, v in weights(model).items())
        if equal and before:
            switched.append(before)
    # steps start at 0, 4, 12, 16, 18, 34, 38, 42, 50, 54: the first at or past 12; past 24 (34); 36 (38); 48 (50)
    assert switched == [12, 34, 38, 50]


def test_switch_momentum_keeps_that_share_of_the_training_weights_and_copy_to_copies():
    plain, plain_model, _ = last(run(SIZES[:3], momentum=MOMENTUM))  # the same three steps, no switch
    theta, zeta = weights(plain_model), {k: v.clone() for k, v in plain.ema_state_dict().items()}
    ema, model, before = last(run(SIZES[:3], momentum=MOMENTUM, switch_every_samples=12, switch_momentum=0.25))
    assert before == 12  # the third step starts at 12: switched after its update
    for name, value in weights(model).items():
        torch.testing.assert_close(value, 0.25 * theta[name] + 0.75 * zeta[name], rtol=1e-6, atol=1e-7)
        assert torch.equal(ema.ema_state_dict()[name], zeta[name])  # the EMA itself is untouched
    plain.copy_to()
    for name, value in weights(plain_model).items():
        assert torch.equal(value, zeta[name]), name
    assert not plain.changed_since_seen()  # its own write does not make the EMA stale


def test_copy_to_is_refused_where_there_is_no_copy_or_it_is_swapped_in():
    ema = next(run([4], momentum=MOMENTUM))[0]
    with (
        ema.swapped(),
        pytest.raises(
            RuntimeError,
            match=r"copy_to\(\) writes the EMA into the model, which holds the EMA now \(swapped in\): call swap_out\(\) first",
        ),
    ):
        ema.copy_to()
    pair = torch.nn.ModuleDict({"online": torch.nn.Linear(3, 2), "teacher": torch.nn.Linear(3, 2)})
    pair["teacher"].requires_grad_(False)
    with pytest.raises(
        RuntimeError,
        match=r"Teacher mode keeps no separate EMA: the EMA weights are the module's teacher submodules \['teacher'\]",
    ):
        ScaledEMA(pair, momentum=MOMENTUM, teachers={"online": "teacher"}).copy_to()


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"warmup": "cosine"}, ValueError, r"`warmup` must be True, False or one of \['ratio', 'inverse-power'\], got 'cosine'"),
        ({"warmup_gamma": 2.0}, ValueError, r"`warmup_gamma`=2.0 shapes the inverse-power warm-up, 1 - \(1 \+ t/warmup_gamma\)\^-warmup_power: set `warmup='inverse-power'` or drop `warmup_gamma` \(warmup=False\)"),
        ({"warmup": True, "warmup_power": 0.5}, ValueError, r"`warmup_power`=0.5 shapes the inverse-power warm-up.*\(warmup=True\)"),
        ({"warmup": "inverse-power", "warmup_gamma": 0.0}, ValueError, r"`warmup_gamma` must be a positive finite number, got 0.0"),
        ({"warmup": "inverse-power", "warmup_power": "2/3"}, TypeError, r"`warmup_power` must be a positive real number, got '2/3'"),
        ({"momentum": 0.9, "min_momentum": 0.95}, ValueError, r"`min_momentum`=0.95 is above `momentum`=0.9, so the momentum would be 0.95 at every step: `min_momentum` must be at most `momentum`"),
        ({"min_momentum": 1.0}, ValueError, r"`min_momentum` must be in \[0, 1\), got 1.0"),
        ({"start_after_samples": -1}, ValueError, r"`start_after_samples` must be an integer >= 0 or None, got -1"),
        ({"debias": 1}, ValueError, r"`debias` must be True or False, got 1"),
        ({"switch_every_samples": 0}, ValueError, r"`switch_every_samples` must be a positive integer or None, got 0"),
        ({"switch_momentum": 0.5}, ValueError, r"`switch_momentum`=0.5 has no effect without `switch_every_samples` \(how often the EMA is written into the model\)"),
        ({"switch_every_samples": 8, "switch_momentum": 1.0}, ValueError, r"`switch_momentum` must be in \[0, 1\), got 1.0"),
        ({"sigma_rels": [0.05], "snapshot_every_samples": 8, "snapshot_dir": "unused", "debias": True}, ValueError, r"\{'debias': True\} have no effect on a post-hoc EMA"),
        ({"sigma_rels": [0.05], "snapshot_every_samples": 8, "snapshot_dir": "unused", "start_after_samples": 4}, ValueError, r"\{'start_after_samples': 4\} have no effect on a post-hoc EMA"),
        ({"center_momenta": {"a": 0.9}, "momentum_attributes": {"a": 0.9}, "base_batch_size": 4}, ValueError, r"\['a'\] are in both `momentum_attributes` and `center_momenta`"),
        ({"center_momenta": {"a": 0.9}}, ValueError, r"`center_momenta` are scaled by the step's global batch over `base_batch_size`: give `base_batch_size`"),
        ({"center_momenta": {"a": 1.5}, "base_batch_size": 4}, ValueError, r"`center_momenta\['a'\]` must be in \[0, 1\), got 1.5"),
        ({"debias": True, "skip_non_finite": True}, ValueError, r"`debias=True` with `skip_non_finite=True`: a skipped update is decided on the device"),
    ],
)  # fmt: skip
def test_errors_name_the_argument_and_what_is_allowed(options, error, match):
    model = new_model()
    with pytest.raises(error, match=match):
        ScaledEMA(model, **options)


def test_switch_is_refused_in_teacher_mode():
    pair = torch.nn.ModuleDict({"online": torch.nn.Linear(3, 2), "teacher": torch.nn.Linear(3, 2)})
    pair["teacher"].requires_grad_(False)
    with pytest.raises(
        ValueError,
        match=r"`switch_every_samples`=8 writes the one averaged copy of a Polyak EMA into the model, and teacher mode keeps none: drop it",
    ):
        ScaledEMA(pair, momentum=MOMENTUM, teachers={"online": "teacher"}, switch_every_samples=8)


@pytest.mark.parametrize(
    "saved, loading, match",
    [
        ({"debias": True}, {}, r"holds 'debias_weight': it was written with `debias`, which this EMA lacks"),
        ({}, {"debias": True}, r"lacks 'debias_weight': it was written without `debias`, which this EMA has"),
        ({"switch_every_samples": 8}, {}, r"holds 'switches': it was written with `switch_every_samples`"),
        ({}, {"switch_every_samples": 8}, r"lacks 'switches': it was written without `switch_every_samples`"),
    ],
)
def test_a_state_saved_with_other_clock_options_is_refused_before_anything_loads(saved, loading, match):
    ema, _, _ = last(run([4, 4], momentum=MOMENTUM, **saved))
    state = ema.state_dict()
    target = ScaledEMA(new_model(), momentum=MOMENTUM, base_batch_size=4, **loading)
    before = {k: v.clone() for k, v in target.ema_state_dict().items()}
    with pytest.raises((KeyError, ValueError), match=match):
        target.load_state_dict(state)
    assert target.samples_seen == 0
    assert all(torch.equal(before[k], v) for k, v in target.ema_state_dict().items())


def test_a_switch_refused_while_swapped_in_is_made_at_the_next_step():
    model = new_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ScaledEMA(model, optimizer, momentum=MOMENTUM, base_batch_size=4, switch_every_samples=4, auto_end_step=False)
    for _ in range(2):
        model(torch.ones(4, 3)).sum().backward()
        ema.count_samples(4)
        optimizer.step()
        optimizer.zero_grad()
    # the second count_samples ended the first step (it starts at 0: no switch); the second starts at 4, so its
    # switch is due when it ends: swapped in, the write is refused and not counted
    ema.swap_in()
    with pytest.raises(
        RuntimeError,
        match=r"the switch due \(`switch_every_samples`\) writes the EMA into the model, which holds the EMA now \(swapped in\): call swap_out\(\) first",
    ):
        ema.end_step()
    ema.swap_out()
    assert ema.state_dict()["switches"] == 0
    model(torch.ones(4, 3)).sum().backward()
    ema.count_samples(4)
    optimizer.step()
    ema.end_step()
    assert ema.state_dict()["switches"] == 2  # made now, for both multiples it started past
    assert all(torch.equal(v, ema.ema_state_dict()[k]) for k, v in weights(model).items())


def test_a_resume_with_another_switch_period_is_refused():
    ema, _, _ = last(run([4, 4, 4], momentum=MOMENTUM, switch_every_samples=4))
    state = ema.state_dict()
    target = ScaledEMA(new_model(), momentum=MOMENTUM, base_batch_size=4, switch_every_samples=8)
    with pytest.raises(
        ValueError,
        match=r"was written with `switch_every_samples`=4, and this EMA has 8: the switches made count multiples of the period",
    ):
        target.load_state_dict(state)
    assert target.samples_seen == 0


def test_a_centre_cannot_be_both_scaled_per_micro_batch_and_updated_per_step():
    lightly_loss = pytest.importorskip("lightly.loss")
    module = torch.nn.Module()
    module.net = torch.nn.Linear(3, 2)
    module.criterion = lightly_loss.DINOLoss(output_dim=4)
    with pytest.raises(
        ValueError,
        match=r"`momentum_attributes` scales 'criterion.center_momentum', the momentum of the centre `center_momenta` updates at 'criterion'",
    ):
        ScaledEMA(module, momentum=MOMENTUM, base_batch_size=4, center_momenta={"criterion": 0.9},
                  momentum_attributes={"criterion.center_momentum": 0.9})  # fmt: skip
    assert module.criterion.center_momentum == 0.9 and "update_center" not in vars(module.criterion)


def test_options_with_the_new_fields_survive_being_checked_again():
    """An adapter rebuilds options with `dataclasses.replace` (the ddp_spawn evaluation), which checks every field
    again: each new field must hold a value its own check accepts."""
    import dataclasses

    from lightning_emascale._options import EMAOptions

    for given in ({}, {"warmup": "inverse-power", "min_momentum": 0.1, "start_after_samples": 0, "debias": True,
                       "switch_every_samples": 4, "switch_momentum": 0.5, "center_momenta": {"c": 0.9}}):  # fmt: skip
        options = EMAOptions(momentum=0.9, base_batch_size=4, **given)
        again = dataclasses.replace(options, optimizer_rule=None)
        assert {f.name: getattr(again, f.name) for f in dataclasses.fields(again)} == {
            f.name: getattr(options, f.name) for f in dataclasses.fields(options)
        }
