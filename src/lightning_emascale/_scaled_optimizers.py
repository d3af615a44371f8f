"""The optimizers an EMA follows: the hooks around their steps, and the optimizer rule applied to one step.

Pure torch, no Lightning. :class:`ScaledOptimizers` checks and hooks the optimizers, scales a step's param groups by
the rule (and restores them right after, so schedulers never see the scaled values), records the learning rate each
step used, and keeps one rule per optimizer: a second rule on the same one would compound.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_emascale._checks import show
from lightning_emascale.rules import (
    NoScalingRule,
    OptimizerRule,
    SavedGroups,
    check_rule_fits,
    restore_param_groups,
    scale_param_groups,
)

# Which owner applies its optimizer rule to an optimizer: a second rule on the same one would compound.
_SCALED_BY: weakref.WeakKeyDictionary[Optimizer, Any] = weakref.WeakKeyDictionary()

Hook = Callable[..., None]


class ScaledOptimizers:
    """The optimizers hooked by one owner (a ``ScaledEMA``), scaled by ``rule`` for one step at a time."""

    def __init__(self, rule: OptimizerRule) -> None:
        self.rule = rule
        #: The optimizers hooked now (unwrapped from Fabric's or Lightning's wrappers).
        self.optimizers: list[Optimizer] = []
        self._handles: list[RemovableHandle] = []
        self._saved: SavedGroups = []
        self.clear_records()

    @property
    def scaling(self) -> bool:
        """Whether the rule changes the optimizers' hyperparameters."""
        return not isinstance(self.rule, NoScalingRule)

    def check(
        self, optimizers: Union[Optimizer, Sequence[Optimizer]], owner: Any, auto_end_step: bool
    ) -> list[Optimizer]:
        """The torch optimizers of ``optimizers``, checked against the rule and against other owners' rules;
        nothing changes here."""
        # a string is a Sequence too: "sgd" is one wrong value, not three
        given: Any = optimizers  # anything may come in: a string is refused as one value below
        single = isinstance(given, (str, bytes)) or not isinstance(given, Sequence)
        listed = [given] if single else list(given)
        unwrapped = [unwrap_optimizer(optimizer, None if single else index) for index, optimizer in enumerate(listed)]
        for index, optimizer in enumerate(unwrapped):
            first = next(i for i, other in enumerate(unwrapped) if other is optimizer)
            if first != index:
                raise ValueError(
                    f"`optimizers` lists one optimizer ({type(optimizer).__name__}) twice, at {first} and {index}:"
                    " list each once"
                )
        check_rule_fits(self.rule, unwrapped)
        if auto_end_step and len(unwrapped) > 1:
            raise ValueError(
                f"`auto_end_step=True` ends the step in an optimizer's post-hook, but {len(unwrapped)} optimizers"
                " were given: pass `auto_end_step=False` and call `end_step()` once after all of them have stepped"
            )
        if not unwrapped and self.scaling:
            raise ValueError(
                f"`optimizer_rule`={self.rule!r} scales the optimizers' steps, but no optimizer was given:"
                " pass `optimizers`, or `optimizer_rule=None` to scale the EMA only"
            )
        for index, optimizer in enumerate(unwrapped):
            other = _SCALED_BY.get(optimizer)
            if self.scaling and other is not None and other is not owner:
                raise ValueError(
                    f"optimizer {index} ({type(optimizer).__name__}) is already scaled by the rule of {other!r}: two"
                    " rules would compound (lr x kappa x kappa). Give `optimizer_rule` to one EMA only; the others"
                    " scale their momentum alone (`optimizer_rule=None`)"
                )
        return unwrapped

    def hook(self, optimizers: list[Optimizer], owner: Any, before: Hook, after: Hook) -> None:
        """Hook ``optimizers`` (checked by :meth:`check`) with ``before`` and ``after`` their steps, for ``owner``."""
        self.optimizers = optimizers
        if self.scaling:
            _SCALED_BY.update(dict.fromkeys(optimizers, owner))
        self.clear_records()
        for optimizer in optimizers:
            self._handles.append(optimizer.register_step_pre_hook(before))
            self._handles.append(optimizer.register_step_post_hook(after))

    def unhook(self, owner: Any) -> None:
        """Remove the hooks and restore the hyperparameters of a step under way."""
        for optimizer in self.optimizers:
            if _SCALED_BY.get(optimizer) is owner:
                del _SCALED_BY[optimizer]
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.restore()

    def scale(self, optimizer: Optimizer, kappa: float) -> None:
        """Apply the rule at ``kappa`` to ``optimizer``'s param groups for its step under way, and record them."""
        # An older torch's AdamW (before it became an Adam subclass) lacks the key; its weight decay is decoupled.
        if isinstance(optimizer, torch.optim.AdamW):
            for group in optimizer.param_groups:
                group.setdefault("decoupled_weight_decay", True)
        self._saved = scale_param_groups(self.rule, optimizer.param_groups, kappa)
        index = next(i for i, hooked in enumerate(self.optimizers) if hooked is optimizer)
        self.step_lrs[index] = [group["lr"] for group in optimizer.param_groups]
        self._group_names[index] = [group.get("name") for group in optimizer.param_groups]

    def restore(self) -> None:
        """Put back the hyperparameters :meth:`scale` changed (nothing to do if none)."""
        restore_param_groups(self._saved)
        self._saved = []

    def clear_records(self) -> None:
        """Forget the learning rates the steps used (a new clock)."""
        #: The learning rate each param group of each optimizer used in its latest step (after the rule).
        self.step_lrs: list[list[float]] = [[] for _ in self.optimizers]
        self._group_names: list[list[Optional[str]]] = [[] for _ in self.optimizers]  # param groups' "name"

    def lr_metrics(self, prefix: str) -> dict[str, float]:
        """The effective learning rates, named as Lightning's ``LearningRateMonitor`` names them: ``lr-SGD``,
        ``-1``/``-2`` for the second and third optimizer of a type, ``/pg1`` or the group's ``"name"`` with several
        param groups."""
        metrics: dict[str, float] = {}
        seen: dict[type, int] = {}
        for optimizer, lrs, names in zip(self.optimizers, self.step_lrs, self._group_names):
            kind = type(optimizer)
            seen[kind] = seen.get(kind, 0) + 1
            key = f"{prefix}/lr-{kind.__name__}" + (f"-{seen[kind] - 1}" if seen[kind] > 1 else "")
            for index, (lr, name) in enumerate(zip(lrs, names)):
                group = name or (f"pg{index + 1}" if len(lrs) > 1 else None)
                metrics[f"{key}/{group}" if group else key] = lr
        return metrics


def unwrap_optimizer(optimizer: Any, index: Optional[int] = None) -> Optimizer:
    """The torch optimizer inside a Fabric or Lightning wrapper (``.optimizer``), or ``optimizer`` itself.

    ``index`` is its place in the list given, for the message.
    """
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), Optimizer):  # Fabric's wrapper subclasses the optimizer
        inner = inner.optimizer
    if not isinstance(inner, Optimizer):
        where = "" if index is None else f" at index {index}"
        raise TypeError(
            f"`optimizers` must be torch optimizers, got {type(optimizer).__name__}: {show(optimizer)}{where} (pass"
            " a torch.optim.Optimizer or a list of them)"
        )
    return inner
