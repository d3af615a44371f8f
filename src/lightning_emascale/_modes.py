"""The three EMA modes: which one the options ask for, its own checks of them, and its averager.

Pure torch, no Lightning. The one place a mode is picked: :func:`options_from` checks an adapter's arguments (every
option's value in :class:`~lightning_emascale._options.EMAOptions`, then the clashes the chosen mode refuses, in its
own module) and :func:`build_averager` builds the mode's :class:`~lightning_emascale._averager.Averager`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import torch

from lightning_emascale import _polyak, _power, _teacher
from lightning_emascale._averager import SAVED_MODES, Averager
from lightning_emascale._options import EMAOptions

_CHECKS = {"polyak": _polyak.check_options, "teacher": _teacher.check_options, "post_hoc": _power.check_options}


def options_from(arguments: Mapping[str, Any]) -> EMAOptions:
    """The options among ``arguments`` (an adapter's constructor arguments, by name), checked: each value, then
    the options that clash with the mode they choose (:func:`check`). An adapter forwards its arguments by keyword
    through this and checks none of them itself."""
    if arguments.get("sigma_rels") is not None:
        _power.check_unused(arguments)
    names = [field.name for field in dataclasses.fields(EMAOptions)]
    options = EMAOptions(**{name: arguments[name] for name in names if name in arguments})
    check(options)
    return options


def check(options: EMAOptions) -> None:
    """Raise for options that clash: those the chosen mode refuses (in its own module), then those that need
    others. Cheap; :meth:`~lightning_emascale.ScaledEMA.from_options` runs it on an adapter's options too."""
    _CHECKS[options.mode](options)
    options.check_combinations()


def build_averager(module: torch.nn.Module, options: EMAOptions, copy_on_swap: bool) -> Averager:
    """The averager of the mode ``options`` choose, over ``module`` (``copy_on_swap``: a Polyak EMA's swaps copy,
    as ``options`` ask or the module's layout needs)."""
    if options.mode == "teacher":
        assert options.teachers is not None
        frozen = _teacher.freeze_teachers(module, options.teachers) if options.freeze_teachers else None
        try:
            return _teacher.TeacherEMA.from_module(module, options.teachers)
        except BaseException:
            if frozen is not None:
                frozen.undo()  # a construction that fails leaves the teachers as they were
            raise
    if options.mode == "post_hoc":
        assert options.sigma_rels is not None
        return _power.PowerEMAs(
            module, options.sigma_rels, options.include, options.exclude, options.snapshot_every_samples,
            options.snapshot_dir,
        )  # fmt: skip
    return _polyak.PolyakEMA.for_options(module, options, copy_on_swap)


def saved_mode(options: EMAOptions) -> tuple[Optional[str], str]:
    """The key under which the mode ``options`` choose saves its tensors in ``ScaledEMA.state_dict()`` (``None``:
    teacher mode saves none), and the mode in words, for checking a saved state before anything is built."""
    averagers: dict[str, type[Averager]] = {
        "polyak": _polyak.PolyakEMA, "teacher": _teacher.TeacherEMA, "post_hoc": _power.PowerEMAs
    }  # fmt: skip
    key = averagers[options.mode].state_key
    return key, SAVED_MODES[key] if key is not None else "in teacher mode"
