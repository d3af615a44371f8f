import math

import pytest
import torch

from lightning_emascale import AdamScalingRule, NoScalingRule, OptimizerRule, ScaledEMA, SGDScalingRule
from lightning_emascale.rules import resolve_rule


def _group(optimizer_cls, **kwargs):
    return optimizer_cls([torch.nn.Parameter(torch.zeros(2))], **kwargs).param_groups[0]


def test_sgd_is_linear_and_keeps_momentum():
    group = _group(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)
    before = dict(group)
    assert SGDScalingRule().scale(group, 8) == {"lr": pytest.approx(0.8)}
    assert group == before  # the rule never mutates the group


def test_adam_rule_values():
    group = _group(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    scaled = AdamScalingRule().scale(group, 4)
    assert scaled["lr"] == pytest.approx(2e-3)
    assert scaled["betas"] == pytest.approx((1 - 4 * 0.1, 1 - 4 * 0.001))
    assert scaled["eps"] == pytest.approx(5e-9)
    assert "weight_decay" not in scaled  # coupled L2 decay is not touched


def test_adamw_scales_decoupled_weight_decay():
    scaled = AdamScalingRule().scale(_group(torch.optim.AdamW, lr=1e-3, weight_decay=0.05), 9)
    assert scaled["weight_decay"] == pytest.approx(0.15)
    assert scaled["lr"] == pytest.approx(3e-3)


def test_rmsprop_scales_alpha_not_momentum():
    scaled = AdamScalingRule().scale(_group(torch.optim.RMSprop, lr=1e-2, alpha=0.99, momentum=0.9), 4)
    assert scaled["alpha"] == pytest.approx(0.96)
    assert "momentum" not in scaled


def test_fractional_kappa_shrinks():
    scaled = AdamScalingRule().scale(_group(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.999)), 0.25)
    assert scaled["lr"] == pytest.approx(5e-4)
    assert scaled["betas"] == pytest.approx((0.975, 0.99975))


def test_beta_out_of_range_is_an_error_not_a_clip():
    group = _group(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.999))
    with pytest.raises(
        ValueError,
        match=r"`betas\[0\]` = 0.9 to 1 - kappa \* \(1 - betas\[0\]\) = \S+ at kappa = 10, outside \(0, 1\).*kappa < 1 / \(1 - betas\[0\]\) = 10",
    ):
        AdamScalingRule().scale(group, 10)
    with pytest.raises(ValueError, match=r"`alpha` = 0.99"):
        AdamScalingRule().scale(_group(torch.optim.RMSprop, alpha=0.99), 200)


def test_supports():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    assert SGDScalingRule().supports(sgd) and not SGDScalingRule().supports(adam)
    assert AdamScalingRule().supports(adam) and not AdamScalingRule().supports(sgd)
    assert NoScalingRule().supports(sgd) and NoScalingRule().supports(adam)


def test_custom_rule_object():
    class SqrtSGD(OptimizerRule):
        optimizer_types = (torch.optim.SGD,)

        def scale(self, group, kappa):
            return {"lr": group["lr"] * math.sqrt(kappa)}

    rule = SqrtSGD()
    assert resolve_rule(rule) is rule
    assert rule.scale({"lr": 0.1}, 4) == {"lr": pytest.approx(0.2)}


@pytest.mark.parametrize("name", ["sgd", "SGD", "adam", "none"])
def test_resolve_names(name):
    assert isinstance(resolve_rule(name), OptimizerRule)


def test_resolve_unknown():
    with pytest.raises(
        ValueError,
        match=r"`optimizer_rule` must be one of \['adam', 'none', 'sgd'\], None, or an OptimizerRule instance, got 'lars'",
    ):
        resolve_rule("lars")
    with pytest.raises(ValueError, match=r"got 3"):
        resolve_rule(3)


class _Returns(OptimizerRule):
    def __init__(self, values):
        self.values = values

    def scale(self, group, kappa):
        return self.values

    def __repr__(self):
        return "Custom()"


@pytest.mark.parametrize(
    ("values", "error", "match"),
    [
        ({"lr": float("nan")}, ValueError, r"Custom\(\).scale returned lr=nan for param group 0; it must hold finite"),
        ({"lr": -0.1}, ValueError, r"returned lr=-0.1 for param group 0; a learning rate must be >= 0"),
        ({"params": []}, ValueError, r"returned `params` for param group 0: a rule scales hyperparameters"),
        (
            {"lrr": 0.1},
            ValueError,
            r"returned 'lrr', which param group 0 does not have \(its keys: \['lr', 'momentum'\]\)",
        ),
        ({"momentum": (0.9, float("inf"))}, ValueError, r"returned momentum=\(0.9, inf\) for param group 0"),
        ([("lr", 0.1)], TypeError, r"returned \[\('lr', 0.1\)\] for param group 0; it must return a dict"),
    ],
)
def test_a_rules_output_is_checked_before_anything_changes(values, error, match):
    from lightning_emascale.rules import scale_param_groups

    groups = [{"params": [], "lr": 0.1, "momentum": 0.9}]
    with pytest.raises(error, match=match):
        scale_param_groups(_Returns(values), groups, kappa=2)
    assert groups == [{"params": [], "lr": 0.1, "momentum": 0.9}]


def test_the_public_rules_check_kappa_and_the_group():
    for rule in (SGDScalingRule(), AdamScalingRule()):
        for kappa, match in ((float("nan"), r"`kappa` must be a positive finite number, got nan"), (0, r"got 0.0")):
            with pytest.raises(ValueError, match=match):
                rule.scale({"lr": 0.1, "betas": (0.9, 0.999)}, kappa=kappa)
        with pytest.raises(
            KeyError, match=r"scales `lr`, which this param group does not have \(its keys: \['eps'\]\)"
        ):
            rule.scale({"params": [], "eps": 1e-8}, kappa=2)


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


# ------------------------------------------------------------------------ out-of-range values, kappa, the base class
@pytest.mark.parametrize(
    ("values", "match"),
    [
        (
            {"momentum": 5.0},
            r"Custom\(\).scale returned momentum=5.0 for param group 0; a momentum must be in \[0, 1\) \(it was 0.9\)",
        ),
        ({"momentum": 1.0}, r"returned momentum=1.0 for param group 0; a momentum must be in \[0, 1\)"),
        ({"momentum": -0.1}, r"returned momentum=-0.1 for param group 0; a momentum must be in \[0, 1\)"),
        ({"lr": -1e-3}, r"returned lr=-0.001 for param group 0; a learning rate must be >= 0 \(it was 0.1\)"),
        (
            {"lr": math.inf},
            r"returned lr=inf for param group 0; it must hold finite numbers \(one number, as it was: 0.1\)",
        ),
        (
            {"betas": (0.9, 1.0)},
            r"returned betas=\(0.9, 1.0\) for param group 0; each of `betas` must be in \[0, 1\) \(it was \(0.9, 0.999\)\)",
        ),
        (
            {"betas": (0.9,)},
            r"returned betas=\(0.9,\) for param group 0; it must hold finite numbers \(a tuple of 2, as it was: \(0.9, 0.999\)\)",
        ),
        ({"betas": 0.9}, r"returned betas=0.9 for param group 0; it must hold finite numbers \(a tuple of 2"),
        ({"eps": -1e-8}, r"returned eps=-1e-08 for param group 0; an `eps` must be >= 0 \(it was 1e-08\)"),
        (
            {"weight_decay": -0.5},
            r"returned weight_decay=-0.5 for param group 0; a weight decay must be >= 0 \(it was 0.01\)",
        ),
        (
            {"dampening": 1.5},
            r"returned dampening=1.5 for param group 0; a dampening must be in \[0, 1\] \(it was 0.0\)",
        ),
        (
            {"nesterov": 1},
            r"returned nesterov=1 for param group 0; `nesterov` is a flag \(it was False\): it must be True or False",
        ),
        (
            {"lr": 10**400},
            r"returned lr=1e\+400 \(an integer of 401 digits\) for param group 0; it must hold finite numbers",
        ),
    ],
)
def test_a_rules_value_out_of_range_is_refused_before_any_group_changes(values, match):
    """A custom rule's momentum 5.0 (or a beta of 1, a negative lr, eps or weight decay) would reach the optimizer's
    step: it is refused naming the rule, the group, the key, the value and what is allowed, with no group changed."""
    from lightning_emascale.rules import scale_param_groups

    def groups():
        return [
            {"params": [], "lr": 0.1, "momentum": 0.9, "dampening": 0.0, "nesterov": False, "betas": (0.9, 0.999),
             "eps": 1e-8, "weight_decay": 0.01},
            {"params": [], "lr": 0.2, "momentum": 0.9, "dampening": 0.0, "nesterov": False, "betas": (0.9, 0.999),
             "eps": 1e-8, "weight_decay": 0.01},
        ]  # fmt: skip

    given = groups()
    with pytest.raises(ValueError, match=match):
        scale_param_groups(_Returns(values), given, kappa=2)
    assert given == groups()


def test_a_value_the_rule_leaves_as_it_was_is_the_optimizers_own_and_not_checked():
    from lightning_emascale.rules import restore_param_groups, scale_param_groups

    groups = [{"params": [], "lr": 0.1, "momentum": 1.0}]  # torch's SGD takes momentum 1.0 itself
    saved = scale_param_groups(_Returns({"lr": 0.2, "momentum": 1.0}), groups, kappa=2)
    assert groups[0]["lr"] == 0.2
    restore_param_groups(saved)
    assert groups == [{"params": [], "lr": 0.1, "momentum": 1.0}]


def test_a_custom_rules_bad_momentum_stops_the_step_with_the_optimizer_and_weights_as_they_were():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    class Momentum5(OptimizerRule):
        optimizer_types = (torch.optim.SGD,)

        def scale(self, group, kappa):
            return {"lr": group["lr"] * kappa, "momentum": 5.0}

    ema = ScaledEMA(model, optimizer, momentum=0.9, base_batch_size=4, optimizer_rule=Momentum5())
    ema.count_samples(8)
    weights = [p.detach().clone() for p in model.parameters()]
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    model(torch.randn(8, 3)).sum().backward()
    with pytest.raises(
        ValueError, match=r"Momentum5\(\).scale returned momentum=5.0 for param group 0; a momentum must"
    ):
        optimizer.step()
    assert [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups] == groups
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_a_rule_that_changes_the_group_in_place_is_refused_and_the_group_put_back():
    from lightning_emascale.rules import scale_param_groups

    class InPlace(OptimizerRule):
        def scale(self, group, kappa):
            group["lr"] *= kappa  # the mistake: the callback would restore nothing after the step
            return {}

    groups = [{"params": [], "lr": 0.1}, {"params": [], "lr": 0.2}]
    with pytest.raises(
        ValueError,
        match=r"InPlace\(\).scale changed param group 0 in place \('lr'\): a rule must leave `group` as it is and"
        r" return a new dict",
    ):
        scale_param_groups(InPlace(), groups, kappa=4)
    assert groups == [{"params": [], "lr": 0.1}, {"params": [], "lr": 0.2}]


@pytest.mark.parametrize(
    ("kappa", "error", "match"),
    [
        (math.nan, ValueError, r"`kappa` must be a positive finite number, got nan"),
        (math.inf, ValueError, r"`kappa` must be a positive finite number, got inf"),
        (0, ValueError, r"`kappa` must be a positive finite number, got 0.0"),
        (-2, ValueError, r"`kappa` must be a positive finite number, got -2.0"),
        pytest.param(
            10**400,
            ValueError,
            r"`kappa` must be a positive finite number, got 1e\+400 \(an integer of 401 digits\), too large",
            id="10**400",
        ),
        ("4", TypeError, r"`kappa` must be a positive real number, got '4'"),
        (None, TypeError, r"`kappa` must be a positive real number, got None"),
    ],
)
def test_every_rule_and_scale_param_groups_refuse_a_kappa_no_rule_could_use(kappa, error, match):
    from lightning_emascale.rules import scale_param_groups

    group = {"params": [], "lr": 0.1, "betas": (0.9, 0.999)}
    for rule in (NoScalingRule(), SGDScalingRule(), AdamScalingRule()):
        with pytest.raises(error, match=match):
            rule.scale(group, kappa)
    groups = [dict(group)]
    with pytest.raises(error, match=match):  # a custom rule that does not check kappa itself
        scale_param_groups(_Returns({"lr": 0.3}), groups, kappa)
    assert groups == [group]


def test_the_base_rule_says_what_to_implement():
    class Half(OptimizerRule):
        pass

    for rule, name in ((OptimizerRule(), "OptimizerRule"), (Half(), "Half")):
        with pytest.raises(
            NotImplementedError,
            match=rf"{name} does not implement `scale\(group, kappa\)`: subclass OptimizerRule and override `scale`"
            r" to return a new dict of the hyperparameters of `group` that change at `kappa` times the base batch"
            r" size, e.g. \{'lr': group\['lr'\] \* kappa\}, or \{\} to change none \(NoScalingRule\)",
        ):
            rule.scale({"lr": 0.1}, 2)
