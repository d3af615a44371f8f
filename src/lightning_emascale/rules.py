"""Optimizer scaling rules: how an optimizer's hyperparameters change when the batch grows by ``kappa``.

A rule is a small object with two methods: :meth:`OptimizerRule.supports` says whether it fits an optimizer,
and :meth:`OptimizerRule.scale` maps one param group's hyperparameters and ``kappa`` to the values the
optimizer step should use. Rules are pure: they read a param-group mapping and return a new dict of the
changed keys, never mutating their input. Nothing here imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Union

import torch

from lightning_emascale._checks import as_real, check_positive, show

__all__ = [
    "AdamScalingRule",
    "NoScalingRule",
    "OptimizerRule",
    "SGDScalingRule",
    "check_rule_fits",
    "resolve_rule",
    "restore_param_groups",
    "scale_param_groups",
]


class OptimizerRule:
    """Base class of optimizer scaling rules. Subclass it to support another optimizer.

    Override :meth:`scale` (and :attr:`optimizer_types` or :meth:`supports`). The callback calls
    :meth:`scale` right before every optimizer step with the step's ``kappa`` and restores the original
    values right after, so a rule never has to undo anything.
    """

    #: Optimizer classes this rule applies to; :meth:`supports` checks ``isinstance`` against them.
    optimizer_types: ClassVar[tuple[type, ...]] = (torch.optim.Optimizer,)

    def supports(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether this rule applies to ``optimizer``."""
        return isinstance(optimizer, self.optimizer_types)

    def scale(self, group: Mapping[str, Any], kappa: float) -> dict[str, Any]:
        """The hyperparameters of ``group`` to use at ``kappa`` times the base batch size.

        Args:
            group: one ``optimizer.param_groups`` entry (read only).
            kappa: batch size of this step divided by the base batch size, ``> 0``.

        Returns:
            A new dict holding only the keys that change.

        Raises:
            NotImplementedError: always, here: a subclass must override it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement `scale(group, kappa)`: subclass OptimizerRule and override"
            " `scale` to return a new dict of the hyperparameters of `group` that change at `kappa` times the base"
            " batch size, e.g. {'lr': group['lr'] * kappa}, or {} to change none (NoScalingRule)"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class NoScalingRule(OptimizerRule):
    """Leave the optimizer alone; only the EMA momentum is scaled.

    Example:
        >>> NoScalingRule().scale({"lr": 0.1}, kappa=4)
        {}
    """

    def scale(self, group: Mapping[str, Any], kappa: float) -> dict[str, Any]:
        check_positive(kappa, "kappa")  # a kappa no rule could use is an error here too
        return {}


class SGDScalingRule(OptimizerRule):
    r"""The linear scaling rule for SGD (with or without momentum): :math:`\eta \to \kappa\eta`.

    Momentum, dampening and weight decay are unchanged (Goyal et al., 2017; Busbridge et al., 2023).

    Example:
        >>> SGDScalingRule().scale({"lr": 0.1, "momentum": 0.9}, kappa=4)
        {'lr': 0.4}
    """

    optimizer_types = (torch.optim.SGD,)

    def scale(self, group: Mapping[str, Any], kappa: float) -> dict[str, Any]:
        return {"lr": _lr(group, self) * check_positive(kappa, "kappa")}


class AdamScalingRule(OptimizerRule):
    r"""The square-root scaling rule for adaptive optimizers (Malladi et al., NeurIPS 2022).

    .. math::
        \eta \to \sqrt\kappa\,\eta, \qquad 1 - \beta \to \kappa (1 - \beta), \qquad
        \epsilon \to \epsilon / \sqrt\kappa, \qquad \lambda_{\text{decoupled}} \to \sqrt\kappa\,\lambda

    Every :math:`\beta` is scaled: both ``betas`` of Adam, AdamW, NAdam, RAdam and Adamax, and RMSprop's
    ``alpha``. RMSprop's heavy-ball ``momentum`` is left as it is. Weight decay is scaled only when it is
    decoupled (AdamW, or ``decoupled_weight_decay=True``), keeping :math:`\eta\lambda` per sample.

    A scaled :math:`\beta` must stay in :math:`(0, 1)`: :math:`\kappa \geq 1 / (1 - \beta)` is a
    configuration error, reported with the offending hyperparameter, never clipped.

    Example:
        >>> scaled = AdamScalingRule().scale({"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}, kappa=4)
        >>> [round(b, 6) for b in scaled["betas"]], scaled["lr"], scaled["eps"]
        ([0.6, 0.996], 0.002, 5e-09)
    """

    optimizer_types = (
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.Adamax,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.RMSprop,
    )

    def scale(self, group: Mapping[str, Any], kappa: float) -> dict[str, Any]:
        kappa = check_positive(kappa, "kappa")
        root = math.sqrt(kappa)
        out: dict[str, Any] = {"lr": _lr(group, self) * root}
        if "betas" in group:
            betas = group["betas"]
            if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence):
                raise ValueError(
                    f"{self!r} scales `betas`, but this param group holds {show(betas)}; a tuple of numbers is allowed"
                )
            out["betas"] = tuple(
                _scale_beta(_number(betas[i], f"betas[{i}]", self), kappa, f"betas[{i}]") for i in range(len(betas))
            )
        if "alpha" in group:
            out["alpha"] = _scale_beta(_number(group["alpha"], "alpha", self), kappa, "alpha")
        if "eps" in group:
            out["eps"] = _number(group["eps"], "eps", self) / root
        if group.get("weight_decay") and group.get("decoupled_weight_decay", False):
            out["weight_decay"] = _number(group["weight_decay"], "weight_decay", self) * root
        return out


def _lr(group: Mapping[str, Any], rule: OptimizerRule) -> Any:
    if "lr" not in group:
        keys = sorted(key for key in group if key != "params")
        raise KeyError(f"{rule!r} scales `lr`, which this param group does not have (its keys: {keys})")
    return _number(group["lr"], "lr", rule)


def _number(value: Any, key: str, rule: OptimizerRule) -> Any:
    """A param group's hyperparameter ``key`` that a rule scales: a finite number (a tensor learning rate, as
    ``capturable`` optimizers hold, is taken as it is: reading it would sync the device)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value
    number = as_real(value)
    if number is None or not math.isfinite(number):
        raise ValueError(
            f"{rule!r} scales `{key}`, but this param group holds {show(value)}; a finite number is allowed"
        )
    return value


def _scale_beta(beta: float, kappa: float, name: str) -> float:
    scaled = 1.0 - kappa * (1.0 - beta)
    # kappa >= 1 / (1 - beta) is out of range even where rounding leaves a tiny positive beta (0.9 at kappa 10).
    limit = 1.0 / (1.0 - beta) if beta < 1.0 else float("inf")
    if not 0.0 < scaled < 1.0 or kappa >= limit * (1.0 - 1e-9):
        raise ValueError(
            f"The adaptive-optimizer scaling rule maps `{name}` = {beta} to 1 - kappa * (1 - {name}) = {scaled:.6g}"
            f" at kappa = {kappa:.6g}, outside (0, 1). It needs kappa < 1 / (1 - {name}) = {limit:.6g}:"
            f" use a larger base_batch_size, a smaller batch, or a {name} closer to 1."
        )
    return scaled


#: The rules of this module, whose output needs no check per step (:func:`scale_param_groups`).
_BUILT_IN: tuple[type[OptimizerRule], ...] = (NoScalingRule, SGDScalingRule, AdamScalingRule)

_RULES: dict[str, type[OptimizerRule]] = {
    "adam": AdamScalingRule,
    "none": NoScalingRule,
    "sgd": SGDScalingRule,
}

RuleLike = Union[str, OptimizerRule, None]


def resolve_rule(rule: RuleLike) -> OptimizerRule:
    """Turn a rule name (``"sgd"``, ``"adam"``, ``"none"``), a rule object or ``None`` into a rule object.

    Example:
        >>> resolve_rule("sgd")
        SGDScalingRule()
        >>> resolve_rule(None)
        NoScalingRule()
    """
    if rule is None:
        return NoScalingRule()
    if isinstance(rule, OptimizerRule):
        if type(rule).scale is OptimizerRule.scale:
            raise ValueError(
                f"`optimizer_rule`={rule!r} does not implement `scale(group, kappa)`: subclass OptimizerRule and"
                " override it, or pass 'sgd', 'adam' or None"
            )
        return rule
    if isinstance(rule, str) and rule.lower() in _RULES:
        return _RULES[rule.lower()]()
    raise ValueError(
        f"`optimizer_rule` must be one of {sorted(_RULES)}, None, or an OptimizerRule instance, got {rule!r}"
    )


#: (param group, its original values, the scaled values written in their place) for every group of a step.
SavedGroups = list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]


def scale_param_groups(rule: OptimizerRule, param_groups: Sequence[dict[str, Any]], kappa: float) -> SavedGroups:
    """Set every group's hyperparameters to the rule's values at ``kappa``, for one optimizer step.

    ``kappa`` is checked first, then every group is scaled and the rule's values checked (the same shape, finite;
    ``lr``, ``eps`` and ``weight_decay`` >= 0, ``momentum`` and each of ``betas`` in [0, 1), ``dampening`` in
    [0, 1], flags True or False) before any group is changed, so a rule that raises or returns a value out of range
    leaves the groups as they were. A rule that changes a group in place instead is refused, the group put back.
    Returns the original values, for :func:`restore_param_groups` right after the step.

    Example:
        >>> groups = [{"lr": 0.1, "momentum": 0.9}]
        >>> saved = scale_param_groups(SGDScalingRule(), groups, kappa=4)
        >>> groups[0]["lr"]
        0.4
        >>> restore_param_groups(saved)
        >>> groups[0]["lr"]
        0.1
    """
    kappa = check_positive(kappa, "kappa")
    if type(rule) in _BUILT_IN:  # they check what they read and return values in range by construction: per step,
        scaled = [rule.scale(group, kappa) for group in param_groups]  # nothing more to pay (hundreds of groups)
    else:
        scaled = [_scale_one(rule, index, group, kappa) for index, group in enumerate(param_groups)]
        for index, (group, values) in enumerate(zip(param_groups, scaled)):
            _check_scaled(rule, index, group, values)
    saved: SavedGroups = []
    for group, values in zip(param_groups, scaled):
        saved.append((group, {key: group[key] for key in values}, values))
        group.update(values)
    return saved


def _scale_one(rule: OptimizerRule, index: int, group: dict[str, Any], kappa: float) -> Any:
    """``rule.scale(group, kappa)``, refused (with the group put back) if the rule changed the group in place."""
    before = dict(group)
    try:
        values = rule.scale(group, kappa)
    finally:
        changed = [key for key in {**before, **group} if key not in group or group.get(key) is not before.get(key)]
        if changed:
            group.clear()
            group.update(before)
    if changed:
        raise ValueError(
            f"{rule!r}.scale changed param group {index} in place ({', '.join(map(repr, changed))}): a rule must"
            " leave `group` as it is and return a new dict of the values that change"
        )
    return values


#: The values a rule may give the hyperparameters that mean the same in every torch optimizer, each entry of a
#: tuple (``betas``) on its own: (what it is, lowest, highest, whether ``highest`` itself is allowed). A value the
#: rule leaves as it was is not checked (it is the optimizer's own). Other numbers need only be finite: their meaning
#: differs between optimizers (``alpha`` is RMSprop's smoothing constant in [0, 1) and ASGD's power).
_RANGES: dict[str, tuple[str, float, float, bool]] = {
    "lr": ("a learning rate", 0.0, math.inf, False),
    "momentum": ("a momentum", 0.0, 1.0, False),
    "dampening": ("a dampening", 0.0, 1.0, True),
    "betas": ("each of `betas`", 0.0, 1.0, False),
    "eps": ("an `eps`", 0.0, math.inf, False),
    "weight_decay": ("a weight decay", 0.0, math.inf, False),
}


def _check_scaled(rule: OptimizerRule, index: int, group: Mapping[str, Any], values: Any) -> None:
    """A rule's output must name existing hyperparameters (never ``params``), keep their shape, hold finite numbers
    where numbers were, and stay in :data:`_RANGES`."""
    where = f"{rule!r}.scale returned"
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{where} {show(values)} for param group {index}; it must return a dict of the values that change"
        )
    for key, value in values.items():
        if key == "params":
            raise ValueError(f"{where} `params` for param group {index}: a rule scales hyperparameters, not parameters")
        if key not in group:
            keys = sorted(k for k in group if k != "params")
            raise ValueError(f"{where} {key!r}, which param group {index} does not have (its keys: {keys})")
        before = group[key]
        if isinstance(before, torch.Tensor) or isinstance(value, torch.Tensor):
            continue  # a tensor hyperparameter (capturable optimizers): reading it would sync the device
        got = f"{where} {key}={show(value)} for param group {index}"
        if isinstance(before, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{got}; `{key}` is a flag (it was {before}): it must be True or False")
            continue
        old = [as_real(item) for item in _flatten(before)]
        if any(number is None for number in old):
            continue  # not a number before the rule either (a name, None): nothing to check
        sequence = isinstance(before, (tuple, list))
        items = _flatten(value) if sequence == isinstance(value, (tuple, list)) else ()
        new = [number for item in items if (number := as_real(item)) is not None and math.isfinite(number)]
        if len(new) != len(old) or len(new) != len(items):
            shape = f"a tuple of {len(old)}" if sequence else "one number"
            raise ValueError(f"{got}; it must hold finite numbers ({shape}, as it was: {show(before)})")
        if key in _RANGES and new != old:
            what, low, high, high_allowed = _RANGES[key]
            if not all(low <= number < high or (high_allowed and number == high) for number in new):
                allowed = f">= {low:g}" if math.isinf(high) else f"in [{low:g}, {high:g}{']' if high_allowed else ')'}"
                raise ValueError(f"{got}; {what} must be {allowed} (it was {show(before)})")


def _flatten(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def restore_param_groups(saved: SavedGroups) -> None:
    """Put back the values :func:`scale_param_groups` replaced, where they still hold the scaled value.

    A value changed since (a scheduler that stepped after a step which raised) is the newer one and stays.
    """
    for group, original, scaled in saved:
        group.update({key: value for key, value in original.items() if key in group and group[key] == scaled[key]})


def check_rule_fits(rule: OptimizerRule, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Raise if ``rule`` does not apply to one of ``optimizers``, naming it and the rules that would."""
    for index, optimizer in enumerate(optimizers):
        if not rule.supports(optimizer):
            raise ValueError(
                f"`optimizer_rule`={rule!r} does not fit optimizer {index} ({type(optimizer).__name__}). Use 'sgd'"
                " for SGD, 'adam' for Adam/AdamW/RMSprop/NAdam/RAdam/Adamax, a custom OptimizerRule, or None to"
                " scale the EMA only."
            )
