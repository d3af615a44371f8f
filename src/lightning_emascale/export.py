"""The EMA weights out of training and back: a safetensors file by the module's names, or ``save_pretrained``.

Pure torch (and ``safetensors``, imported when a file is written or read); no Lightning import. Each function takes a
:class:`~lightning_emascale.ScaledEMA` or anything holding one as ``scaled_ema`` (an
:class:`~lightning_emascale.EMAScalingCallback` after fit started), in Polyak mode on an unsharded module.

The file holds every tensor the EMA tracks once, under its first name (``module.named_parameters()`` and
``named_buffers()`` order); each other name of a tied tensor is recorded in the metadata as ``alias -> kept name``,
the convention of ``safetensors.torch.save_model``, so that ``safetensors.torch.load_model(model, path)`` loads it
into a copy of the model with its ties, and :func:`load_ema_weights` reads it back into the EMA.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from lightning_emascale._ema_of import polyak_of
from lightning_emascale._polyak import PolyakEMA

__all__ = ["load_ema_weights", "save_ema_pretrained", "save_ema_weights"]

#: The metadata entry that marks a file this module wrote, with the layout's version.
_FORMAT_KEY = "lightning_emascale.format"
_FORMAT = "ema_weights/1"
#: The metadata entry that says which dtype the values were written in (``"ema"``, ``"model"`` or a torch dtype).
_DTYPE_KEY = "lightning_emascale.dtype"
_RESERVED_PREFIX = "lightning_emascale."

_DTypeChoice = Union[Literal["ema", "model"], torch.dtype]  # the choices of `save_ema_weights(dtype=...)`


def save_ema_weights(
    ema: Any,
    path: Union[str, os.PathLike],
    metadata: Optional[Mapping[str, str]] = None,
    dtype: Union[Literal["ema", "model"], torch.dtype] = "ema",
) -> None:
    """Write the EMA weights to a safetensors file, by the module's parameter and buffer names.

    Every tensor the EMA tracks is written once, under its first name, as a contiguous CPU copy; the other names of a
    tied tensor go into the metadata as ``alias -> kept name`` (as ``safetensors.torch.save_model`` records them), so
    ``safetensors.torch.load_model(model, path)`` gives a copy of the model the EMA weights with its ties, and
    :func:`load_ema_weights` reads the file back into the EMA bit for bit. Tensors left out of the EMA (``include``,
    ``exclude``, non-persistent buffers) are not in the file: load it with ``strict=False`` then.

    Args:
        ema: a :class:`~lightning_emascale.ScaledEMA` in Polyak mode, or an object holding one as ``scaled_ema``
            (an :class:`~lightning_emascale.EMAScalingCallback`).
        path: the file to write (replaced if it exists).
        metadata: text entries to store in the file's header (``str -> str``), e.g. the step; keys must not start
            with ``"lightning_emascale."`` nor be one of the module's tensor names (those record the aliases).
        dtype: the dtype of the floating-point values: ``"ema"`` (default) the EMA's own, lossless (float32 for a
            bf16 parameter with ``ema_precision="fp32"``); ``"model"`` the module's dtype of each tensor (the weights
            as the model computes with them, half the size for bf16); or a floating-point ``torch.dtype``. Integer
            buffers keep theirs.

    Raises:
        ImportError: ``safetensors`` is not installed.
        RuntimeError: teacher or post-hoc mode (no averaged copy to write).
        NotImplementedError: a sharded module (FSDP2, tensor parallelism, FSDP1, DeepSpeed ZeRO-3).
        ValueError: a bad ``dtype`` or ``metadata``.

    Example:
        >>> import os, tempfile, torch
        >>> from safetensors.torch import load_file
        >>> from lightning_emascale import ScaledEMA
        >>> from lightning_emascale.export import save_ema_weights
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = ScaledEMA(model, momentum=0.9)
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     path = os.path.join(directory, "ema.safetensors")
        ...     save_ema_weights(ema, path, metadata={"step": "1000"})
        ...     sorted(load_file(path))
        ['bias', 'weight']
    """
    _, averager = polyak_of(ema, "save_ema_weights", _EXPORT_SHARDED)
    save_file = _safetensors().torch.save_file
    header = _checked_metadata(metadata, averager)
    choice = _checked_dtype(dtype)
    averages = averager.averages_state_dict()  # flushed: an update under way has finished
    tensors: dict[str, Tensor] = {}
    for index, name in enumerate(averager.names):
        average, tracked = averages[name], averager.tracked[index]
        if not average.is_floating_point() or choice == "ema":
            target = average.dtype
        elif choice == "model":
            target = tracked.dtype
        else:
            target = choice
        # A copy of its own: the averages are views into shared buffers, which safetensors refuses
        tensors[name] = average.detach().to("cpu", target, memory_format=torch.contiguous_format, copy=True)
    for alias, index in averager.index_of_name.items():
        first = averager.names[index]
        if alias != first:
            header[alias] = first
    header[_FORMAT_KEY] = _FORMAT
    header[_DTYPE_KEY] = choice if isinstance(choice, str) else str(choice).removeprefix("torch.")
    save_file(tensors, os.fspath(path), metadata=header)


def load_ema_weights(ema: Any, path: Union[str, os.PathLike]) -> dict[str, str]:
    """Read a safetensors file of EMA weights (:func:`save_ema_weights`) back into the EMA's averages.

    A file of plain model weights works too where its names match the module's (``safetensors.torch.save_model(
    model, path)``, or ``save_file`` of a ``state_dict`` without ties): the EMA then starts from those weights.
    Each tracked tensor is read under its first name or, for a tied tensor, under any of its names; tensors the EMA
    leaves out (``exclude``) may be in the file and are skipped. Values are cast to the EMA's dtype (a bf16 file into
    an fp32 EMA is exact; an fp32 file into a bf16 EMA rounds). Every name, dtype and shape is checked before
    anything is copied: a refusal leaves the EMA as it was. The module's own weights are not touched.

    Args:
        ema: a :class:`~lightning_emascale.ScaledEMA` in Polyak mode, or an object holding one as ``scaled_ema``
            (an :class:`~lightning_emascale.EMAScalingCallback`).
        path: the safetensors file to read.

    Returns:
        The file's own metadata entries (those given to :func:`save_ema_weights`, without the aliases and
        ``lightning_emascale.*`` entries).

    Raises:
        ImportError: ``safetensors`` is not installed.
        FileNotFoundError: no file at ``path``.
        RuntimeError: teacher or post-hoc mode, or the EMA is swapped into the module now.
        NotImplementedError: a sharded module.
        KeyError: names missing from the file, or names in it that the module does not have.
        ValueError: not a safetensors file, a shape that differs, tied names with different values, a non-finite
            parameter.
        TypeError: a floating-point value for an integer tensor, or the reverse.

    Example:
        >>> import os, tempfile, torch
        >>> from lightning_emascale import ScaledEMA
        >>> from lightning_emascale.export import load_ema_weights, save_ema_weights
        >>> ema = ScaledEMA(torch.nn.Linear(2, 1), momentum=0.9)
        >>> fresh = ScaledEMA(torch.nn.Linear(2, 1), momentum=0.9)
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     path = os.path.join(directory, "ema.safetensors")
        ...     save_ema_weights(ema, path, metadata={"step": "1000"})
        ...     load_ema_weights(fresh, path)
        {'step': '1000'}
        >>> torch.equal(fresh.ema_state_dict()["weight"], ema.ema_state_dict()["weight"])
        True
    """
    scaled, averager = polyak_of(ema, "load_ema_weights", _EXPORT_SHARDED)
    safetensors = _safetensors()
    shown = repr(os.fspath(path))
    if scaled.is_swapped:
        raise RuntimeError(
            f"load_ema_weights({shown}) while the EMA is swapped into the module: the module would keep the old EMA"
            " until swap_out(). Call swap_out() (or leave the swapped() block) first"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_ema_weights: no file at {shown}: pass the file `save_ema_weights` wrote")
    try:
        with safetensors.safe_open(os.fspath(path), framework="pt", device="cpu") as file:
            header = dict(file.metadata() or {})
            values = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        raise ValueError(f"{shown} is not a safetensors file that can be read ({error})") from error
    saved = _by_first_name(values, averager, shown)
    try:
        averager.load_averages(saved)  # dtypes, shapes and finite parameters, all checked before the first copy
    except (KeyError, ValueError, TypeError) as error:
        message = error.args[0] if error.args else str(error)
        raise type(error)(f"{shown}: {message}") from error
    return {key: value for key, value in header.items() if not _is_ours(key, averager)}


def save_ema_pretrained(ema: Any, directory: Union[str, os.PathLike], **kwargs: Any) -> Any:
    """Save the EMA weights with the module's own ``save_pretrained`` (Hugging Face transformers, diffusers, PEFT).

    The EMA is swapped into the module (``with ema.swapped():``) while ``save_pretrained`` runs, so the files hold
    the EMA in the module's dtype, with its config, and the training weights come back bit for bit after (also when
    ``save_pretrained`` raises). Inside a ``swapped()`` block the module already holds the EMA: it is saved as it is.

    Args:
        ema: a :class:`~lightning_emascale.ScaledEMA` in Polyak mode, or an object holding one as ``scaled_ema``
            (an :class:`~lightning_emascale.EMAScalingCallback`).
        directory: the directory to save into, passed to ``save_pretrained`` first.
        **kwargs: passed on to ``save_pretrained`` (``safe_serialization=``, ``push_to_hub=``, ...).

    Returns:
        What ``save_pretrained`` returns.

    Raises:
        TypeError: the module has no ``save_pretrained`` method.
        RuntimeError: teacher or post-hoc mode.
        NotImplementedError: a sharded module.

    Example:
        >>> import os, tempfile, torch
        >>> from lightning_emascale import ScaledEMA
        >>> from lightning_emascale.export import save_ema_pretrained
        >>> class Pretrained(torch.nn.Linear):  # a stand-in for a transformers or diffusers model
        ...     def save_pretrained(self, directory):
        ...         torch.save(self.state_dict(), os.path.join(directory, "weights.pt"))
        >>> model = Pretrained(2, 1)
        >>> ema = ScaledEMA(model, momentum=0.9)
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     save_ema_pretrained(ema, directory)
        ...     os.listdir(directory)
        ['weights.pt']
    """
    scaled, _ = polyak_of(ema, "save_ema_pretrained", _EXPORT_SHARDED)
    save_pretrained = getattr(scaled.module, "save_pretrained", None)
    if not callable(save_pretrained):
        raise TypeError(
            f"save_ema_pretrained needs a module with a `save_pretrained` method (a Hugging Face transformers,"
            f" diffusers or PEFT model), and {type(scaled.module).__name__} has none: write a safetensors file with"
            " `save_ema_weights(ema, 'ema.safetensors')`, or save inside `with ema.swapped():` yourself"
        )
    if scaled.is_swapped:
        return save_pretrained(directory, **kwargs)
    with scaled.swapped():
        return save_pretrained(directory, **kwargs)


# ---------------------------------------------------------------------------------------------- shared checks
_EXPORT_SHARDED = (
    "Save a full checkpoint instead (`save_distributed_checkpoint=False`; FSDP1 `state_dict_type='full'`), whose"
    " `state_dict` holds the gathered EMA, or under DeepSpeed consolidate the checkpoint directory with"
    " `lightning_emascale.consolidate_deepspeed_checkpoint`; then load that into the unsharded model"
)


def _safetensors() -> Any:
    try:
        import safetensors
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            "Writing and reading EMA weights as safetensors files needs the `safetensors` package: `pip install"
            " safetensors` (or `pip install lightning-emascale[export]`)"
        ) from error
    return safetensors


def _checked_dtype(dtype: Any) -> _DTypeChoice:
    if dtype in ("ema", "model") or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    raise ValueError(f"`dtype` must be 'ema', 'model' or a floating-point torch.dtype, got {dtype!r}")


def _checked_metadata(metadata: Optional[Mapping[str, str]], averager: PolyakEMA) -> dict[str, str]:
    """A copy of ``metadata`` (never the caller's dict), checked: text only, no reserved or tensor name."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"`metadata` must be a dict of str -> str, got {type(metadata).__name__}")
    bad = [(key, value) for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise ValueError(
            f"`metadata` must be a dict of str -> str (safetensors stores text only), got {bad[0][0]!r}:"
            f" {bad[0][1]!r}; write numbers with str() or json.dumps()"
        )
    clashing = sorted(key for key in metadata if _is_ours(key, averager))
    if clashing:
        raise ValueError(
            f"`metadata` keys {clashing} are reserved: keys starting with {_RESERVED_PREFIX!r} and the module's tensor"
            " names (they record the aliases of tied tensors). Rename them"
        )
    return dict(metadata)


def _is_ours(key: str, averager: PolyakEMA) -> bool:
    return key.startswith(_RESERVED_PREFIX) or key in averager.index_of_name or key in averager.untracked_names


def _by_first_name(values: Mapping[str, Tensor], averager: PolyakEMA, shown: str) -> dict[str, Tensor]:
    """The file's tensors by the EMA's first names (a tied tensor under any of its names), after checking that the
    names match; raises ``KeyError`` naming the file and the names, ``ValueError`` for tied names that differ."""
    names_of: dict[int, list[str]] = {}
    for name, index in averager.index_of_name.items():
        names_of.setdefault(index, []).append(name)
    saved: dict[str, Tensor] = {}
    missing: list[str] = []
    for index, first in enumerate(averager.names):
        found = [name for name in names_of[index] if name in values]
        if not found:
            missing.append(first)
            continue
        saved[first] = values[found[0]]
        differing = [name for name in found[1:] if not _same(values[name], values[found[0]])]
        if differing:
            raise ValueError(
                f"{shown} holds different values for {found[0]!r} and {differing}, which are one tied tensor in the"
                " module: tie them in the model the file was written from, or drop the copies from the file"
            )
    unexpected = sorted(set(values) - set(averager.index_of_name) - averager.untracked_names)
    if missing or unexpected:
        raise KeyError(
            f"{shown} does not match the module's EMA: missing {missing}, unexpected {unexpected}. Was it written for"
            " another model? Load a file written from this model (`save_ema_weights`, or"
            " `safetensors.torch.save_model(model, path)`), or rename its entries to the module's parameter and buffer"
            " names"
        )
    return saved


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
