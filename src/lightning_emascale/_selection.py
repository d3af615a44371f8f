"""Which of a module's parameters and buffers an EMA averages (``include``, ``exclude``, non-persistent buffers).

Pure torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from lightning_emascale._sharded import clean_name


def select_tensors(
    module: torch.nn.Module, include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None
) -> tuple[list[tuple[str, Tensor]], frozenset[str]]:
    """The named parameters and buffers of ``module`` to average, and the names left out.

    A name is selected by an entry of ``include`` (or by default when ``include`` is ``None``) and left out by
    one of ``exclude``; an entry matches a tensor's name or any tensor under a submodule path (``"disc"``
    matches ``"disc.0.weight"``). Non-persistent buffers (not in the module's ``state_dict``, e.g. an annealed
    temperature) are left out unless ``include`` names them exactly. A tied tensor left out under one name is left out.
    Raises ``ValueError`` for an entry that matches nothing and when nothing is left to average.
    """
    named = [
        (clean_name(name), tensor)  # FSDP1's wrappers' names are not in the module's checkpoint keys
        for name, tensor in [
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        ]
    ]
    non_persistent = {
        clean_name(f"{prefix}.{name}" if prefix else name)
        for prefix, submodule in module.named_modules(remove_duplicate=False)
        for name in submodule._non_persistent_buffers_set
    }

    def matches(name: str, entries: Sequence[str]) -> bool:
        return any(name == entry or name.startswith(entry + ".") for entry in entries)

    if not named:
        raise ValueError(
            f"{type(module).__name__} has no parameters or buffers, so there is nothing to average: pass the module"
            " that holds the weights"
        )
    for option, entries in (("include", include), ("exclude", exclude)):
        for entry in entries or ():
            if not any(matches(name, [entry]) for name, _ in named):
                children = [name for name, _ in module.named_children()]
                raise ValueError(
                    f"`{option}` names {entry!r}, which is no parameter, buffer or submodule of"
                    f" {type(module).__name__}; its children are {children}"
                )
    left_out = {
        id(tensor)
        for name, tensor in named
        if matches(name, exclude or ())
        or (include is not None and not matches(name, include))
        or (name in non_persistent and name not in (include or ()))  # only by its exact name
    }
    selected = [(name, tensor) for name, tensor in named if id(tensor) not in left_out]
    if named and not selected:
        raise ValueError(
            f"`include`={include!r} and `exclude`={exclude!r} leave nothing of {type(module).__name__} to average"
        )
    return selected, frozenset(name for name, tensor in named if id(tensor) in left_out)
