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
