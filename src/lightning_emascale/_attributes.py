"""Momentum attributes: numbers on a module (DINO's loss center momentum) kept batch-size invariant. No Lightning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from lightning_emascale._checks import as_real
from lightning_emascale.functional import scale_ema_momentum


@dataclass
class MomentumAttribute:
    """One attribute at ``path`` of a module, holding a momentum tuned at the base batch size.

    The owner updates its own EMA on every forward pass, so :meth:`scale_for` sets it to
    :math:`\\rho^{b/B}` before each micro-batch of :math:`b` samples (global); :meth:`restore` puts back the
    value it had when it was resolved.
    """

    path: str
    owner: Any
    attribute: str
    original: float
    base_momentum: float

    @classmethod
    def resolve(
        cls, module: Any, path: str, base_momentum: float, original: Optional[float] = None
    ) -> MomentumAttribute:
        """Find the attribute at the dotted ``path`` of ``module``; raise if it is missing, not a number or read-only.
        ``original``: the value to restore, where the attribute holds a scaled one now (a re-attach)."""
        *owners, attribute = path.split(".")
        owner: Any = module
        try:
            for part in owners:
                owner = getattr(owner, part)
            value = getattr(owner, attribute)
        except AttributeError:
            raise ValueError(
                f"`momentum_attributes` names {path!r}, which {type(module).__name__} does not have"
            ) from None
        number = as_real(value)
        if number is None:
            raise ValueError(f"`momentum_attributes` names {path!r}, which holds {value!r}, not a number")
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            raise ValueError(
                f"`momentum_attributes` names {path!r}, a {value.dtype} tensor, which cannot hold a scaled momentum"
                " (it would be truncated): make it a floating-point tensor or a float"
            )
        declared = getattr(type(owner), attribute, None)
        if isinstance(declared, property) and declared.fset is None:
            raise ValueError(
                f"`momentum_attributes` names {path!r}, a read-only property of {type(owner).__name__} (no setter),"
                " which cannot be scaled: name the attribute that holds the momentum, or give the property a setter"
            )
        if original is None:  # a tensor is kept as its value: it is written in place, so the object changes with it
            original = value if isinstance(value, (int, float)) else number
        return cls(path, owner, attribute, original, base_momentum)

    @property
    def value(self) -> float:
        """The attribute's current value."""
        return float(getattr(self.owner, self.attribute))

    def scale_for(self, kappa: float) -> None:
        """Set the attribute to the base momentum raised to ``kappa`` (one micro-batch's size / base batch)."""
        self._write(scale_ema_momentum(self.base_momentum, kappa))

    def restore(self) -> None:
        self._write(self.original)

    def _write(self, value: float) -> None:
        fill = getattr(getattr(self.owner, self.attribute, None), "fill_", None)
        if callable(fill):  # a 0-d tensor (a registered buffer): write in place
            fill(value)
        else:
            setattr(self.owner, self.attribute, value)
