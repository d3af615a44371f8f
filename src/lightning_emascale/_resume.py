"""What a fit that resumes from a checkpoint reads for the EMA callback, checked before anything is written.

Lightning loads the checkpoint's ``state_dict`` into the module before any callback sees the checkpoint. With
``evaluate_with_ema`` that ``state_dict`` holds the EMA (for ``load_from_checkpoint``), and the callback puts the
training weights back from its state's ``"raw_state_dict"``. Two things must hold before it does:

- the callback's state is whole and fits this module and this mode (:func:`check_resumed_state`), so that a refusal
  leaves the module as Lightning loaded it and the EMA as it was;
- a fit never trains on from the EMA by accident: when the checkpoint's ``state_dict`` holds an EMA whose training
  weights this callback cannot put back (its state lacks them, or they sit under another callback's key),
  :func:`refuse_resume_from_ema` stops it unless the user asked to continue from the EMA.

Lightning only reads the checkpoint here; no hook is called.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_emascale._flat_group import same_dtype_kind
from lightning_emascale._modes import saved_mode
from lightning_emascale._options import EMAOptions
from lightning_emascale._saved_state import check_mode
from lightning_emascale._selection import select_tensors
from lightning_emascale._sharded import clean_name
from lightning_emascale.core import ScaledEMA

#: The entry of the callback's saved state that says what the checkpoint's model entries hold: ``"ema"`` or
#: ``"training"`` (checkpoints written before it existed lack it: see :func:`model_entries_hold_ema`).
MODEL_ENTRIES = "model_entries"
#: The option that continues a fit from the EMA on purpose.
RESUME_OPTION = "resume_from_ema"


def check_callback_state(state: Any, where: str) -> None:
    """Raise ``TypeError`` unless the callback's entry in a checkpoint is a dict."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{where} must be a dict (what the callback's `state_dict()` returned), got {type(state).__name__}: the"
            " checkpoint was edited or written by something else"
        )


def check_resumed_state(
    state: Mapping[str, Any], module: torch.nn.Module, options: EMAOptions, sharded: bool, where: str
) -> None:
    """Raise unless ``state`` (the callback's entry) resumes ``module`` in the mode of ``options``: its clock and
    tensors (:meth:`ScaledEMA.check_state_dict`), its mode, and (unsharded: a sharded module's shards are checked
    as they are read) every EMA and training tensor against the module's entry: name, shape, floating point or not,
    and finite. Nothing is written."""
    ScaledEMA.check_state_dict(state, where)
    if "sharded_ema_in_state_dict" in state:
        return  # a distributed checkpoint: the EMA lies beside the model's shards, checked as each rank reads its own
    key, description = saved_mode(options)
    check_mode(state, key, description, where)
    raw = state.get("raw_state_dict")
    if raw is not None and not isinstance(raw, Mapping):
        raise TypeError(f"{where} has raw_state_dict of type {type(raw).__name__}; a dict of tensors is allowed")
    if sharded:
        return
    # The EMA's names are those the averager selects (a non-persistent buffer named in `include` too), the training
    # weights' those of the module's own `state_dict`. Only parameters must be finite (a buffer may hold a mask).
    named = {
        clean_name(name): tensor
        for name, tensor in (
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        )
    }
    parameters = {clean_name(name) for name, _ in module.named_parameters(remove_duplicate=False)}
    model = type(module).__name__
    for name, value in state.get("ema", {}).items():
        _check_entry(where, "ema", name, value, named.get(name), model, parameters)
    if raw:
        entries = module.state_dict()
        for name, value in raw.items():
            _check_entry(where, "raw_state_dict", name, value, entries.get(name), model, parameters)
    if key == "ema":
        selected, _ = select_tensors(module, options.include, options.exclude)
        first = {id(tensor): name for name, tensor in reversed(selected)}  # a tied tensor under its first name
        missing = sorted(set(first.values()) - set(state["ema"]))
        if missing:
            raise KeyError(
                f"{where} lacks the EMA of {missing[:5]}{' and more' if len(missing) > 5 else ''}, which this"
                " callback averages: was the checkpoint written for another model, or with other `include`/`exclude`?"
            )


def _check_entry(
    where: str, label: str, name: str, value: Any, entry: Optional[Tensor], model: str, parameters: Collection[str]
) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{where} has {label}[{name!r}] of type {type(value).__name__}; a tensor is allowed")
    if entry is None:
        raise KeyError(
            f"{where} has {label}[{name!r}], which {model} does not have: was the checkpoint written for another model?"
        )
    if value.shape != entry.shape:
        raise ValueError(
            f"{where} has {label}[{name!r}] of shape {tuple(value.shape)}; the model's is {tuple(entry.shape)}"
        )
    if not same_dtype_kind(value, entry):
        raise TypeError(
            f"{where} has {label}[{name!r}] of dtype {value.dtype}; the model's is {entry.dtype} (a"
            f" {'floating-point' if entry.is_floating_point() else 'non-floating-point'} dtype is allowed)"
        )
    if value.is_floating_point() and name in parameters and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{where} has a non-finite {label}[{name!r}] (a parameter); the checkpoint is corrupt")


def ema_put_into_model(state: Mapping[str, Any]) -> bool:
    """Whether the callback that wrote ``state`` put its EMA into the checkpoint's model entries (its training
    weights in ``"raw_state_dict"``, or beside a distributed checkpoint's shards)."""
    return state.get("raw_state_dict") is not None or bool(state.get("model_holds_ema"))


def model_entries_hold_ema(state: Mapping[str, Any], model_state: Mapping[str, Any]) -> bool:
    """Whether the checkpoint's model entries (``model_state``) hold the EMA whose callback state is ``state``.

    Said by the state itself since it has :data:`MODEL_ENTRIES`; for an older checkpoint, the model entries hold the
    EMA where they equal it after at least one update (with ``evaluate_with_ema=False`` they hold the training
    weights, which differ from the EMA unless ``momentum`` is 0)."""
    said = state.get(MODEL_ENTRIES)
    if said is not None:
        return said == "ema"
    if ema_put_into_model(state):
        return True
    averages = state.get("ema")
    if not isinstance(averages, Mapping) or not averages or not state.get("ema_updates"):
        return False
    return all(
        isinstance(model_state.get(name), Tensor)
        and isinstance(value, Tensor)
        and model_state[name].shape == value.shape
        and torch.equal(model_state[name], value.to(model_state[name].dtype))
        for name, value in averages.items()
    )


def ema_states_of_others(checkpoint: Mapping[str, Any], present: Collection[str]) -> list[str]:
    """The keys of states in ``checkpoint`` whose EMA its model entries hold and whose callback is not among the
    Trainer's (``present``: their state keys), so that nothing will put its training weights back."""
    model_state = checkpoint.get("state_dict", {})
    return [
        key
        for key, state in checkpoint.get("callbacks", {}).items()
        if key not in present
        and isinstance(state, Mapping)
        and "format" in state
        and "ema_updates" in state
        and model_entries_hold_ema(state, model_state)
    ]


def refuse_resume_from_ema(own_key: str, found: str, own_state_lacks_weights: bool) -> None:
    """Raise: the module would train on from the EMA that the checkpoint's model entries hold, whose training
    weights sit under ``found`` (a state key) or nowhere."""
    where = (
        f"its state {found!r} lacks the training weights (`raw_state_dict`)"
        if own_state_lacks_weights
        else f"its training weights are in the state {found!r}, which this callback ({own_key!r}) does not read"
    )
    raise RuntimeError(
        f"The checkpoint's `state_dict` holds an EMA, not the training weights, and {where}: resuming would continue"
        " training from the EMA. Resume with the callback that wrote it (the same class and `name`), or pass"
        f" `{RESUME_OPTION}=True` to continue from the EMA on purpose."
    )
