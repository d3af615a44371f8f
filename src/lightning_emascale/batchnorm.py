"""BatchNorm statistics for the EMA weights. Pure torch, no Lightning.

An EMA of the weights is not an EMA of what the weights compute: BatchNorm's running mean and variance, averaged
along with the weights, describe the activations of the training weights at earlier steps, not those of the
averaged weights. :func:`update_bn` recomputes them with the EMA weights, as ``torch.optim.swa_utils.update_bn``
does for an ``AveragedModel`` (and Lightning's ``StochasticWeightAveraging`` in an extra epoch), and stores them as
the EMA's running statistics; the training weights and buffers are left exactly as they were.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_emascale._checks import check_positive_int
from lightning_emascale._ema_of import polyak_of

__all__ = ["update_bn"]

_SHARDED = (
    "Recompute the statistics on one process: load the EMA into an unsharded model (a full checkpoint; under"
    " DeepSpeed one consolidated with `lightning_emascale.consolidate_deepspeed_checkpoint`) and call update_bn on a"
    " ScaledEMA of it"
)


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    ema: Any,
    forward: Optional[Callable[[Any], Any]] = None,
    max_batches: Optional[int] = None,
) -> int:
    """Recompute the BatchNorm running statistics of the EMA weights over ``loader``, and store them in the EMA.

    With the EMA swapped in, every BatchNorm layer (``torch.nn.modules.batchnorm._BatchNorm`` with running
    statistics: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) has its statistics reset, its ``momentum`` set to
    ``None`` (a cumulative average over the batches, as ``torch.optim.swa_utils.update_bn`` does) and is put in
    training mode, the rest of the module in evaluation mode (dropout off, as at inference, so BatchNorm sees the
    inputs it will see then; this is where the result can differ from torch's ``update_bn``, which puts the whole
    model in training mode). ``forward`` runs on at most ``max_batches`` batches under ``torch.no_grad()``. The new
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` (the batches run) are written into the EMA's averages
    of those buffers; everything else comes back as it was: the training weights and buffers bit for bit (also when
    ``forward`` raises), every module's training flag and every BatchNorm's momentum. Works with both swaps
    (``copy_on_swap``). Under DDP each rank computes the statistics of the batches it is given; a ``SyncBatchNorm``
    synchronises them in training mode, so call it on every rank with the same number of batches then.

    Call it when training ends (the next EMA update would move the statistics towards the training ones again).

    Args:
        loader: the batches to run, typically the training ``DataLoader`` (any iterable).
        ema: a :class:`~lightning_emascale.ScaledEMA` in Polyak mode, or an object holding one as ``scaled_ema``
            (an :class:`~lightning_emascale.EMAScalingCallback`).
        forward: a callable of one batch that runs the module (its result is ignored). ``None``: ``module(batch)``
            for a tensor, ``module(batch[0])`` for a list or tuple (``(inputs, targets)``), ``module(**batch)`` for
            a dict (Hugging Face batches); each tensor moved to the device of the module's first parameter.
        max_batches: run at most this many batches; ``None``: the whole loader.

    Returns:
        The number of batches run.

    Raises:
        RuntimeError: teacher or post-hoc mode, or the EMA is swapped in now.
        NotImplementedError: a sharded module.
        ValueError: no BatchNorm layer with running statistics, BatchNorm statistics the EMA does not track, an
            empty loader, a bad ``max_batches``.
        TypeError: ``forward`` not callable, ``loader`` not iterable, a batch the default ``forward`` cannot run.

    Example:
        >>> import torch
        >>> from lightning_emascale import ScaledEMA
        >>> from lightning_emascale.batchnorm import update_bn
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        >>> ema = ScaledEMA(model, momentum=0.9)
        >>> loader = [torch.randn(8, 2) for _ in range(4)]
        >>> update_bn(loader, ema)
        4
        >>> int(ema.ema_state_dict()["1.num_batches_tracked"]), int(model[1].num_batches_tracked)  # EMA, training
        (4, 0)
    """
    scaled, averager = polyak_of(ema, "update_bn", _SHARDED)
    if forward is not None and not callable(forward):
        raise TypeError(f"`forward` must be a callable of one batch that runs the module, or None, got {forward!r}")
    max_batches = check_positive_int(max_batches, "max_batches", allow_none=True)
    if scaled.is_swapped:
        raise RuntimeError("update_bn() swaps the EMA in itself: call it outside a swapped() block (after swap_out())")
    module = scaled.module
    norms = [
        (name, layer)
        for name, layer in module.named_modules()
        if isinstance(layer, _BatchNorm) and layer.track_running_stats and layer.running_mean is not None
    ]
    if not norms:
        raise ValueError(
            f"update_bn: {type(module).__name__} has no BatchNorm layer with running statistics (BatchNorm1d/2d/3d or"
            " SyncBatchNorm with `track_running_stats=True`), so there are no statistics to recompute"
        )
    index_of_tensor = {id(tensor): index for index, tensor in enumerate(averager.tracked)}
    statistics: list[tuple[_BatchNorm, str, int]] = []  # (layer, buffer name, index in the EMA)
    untracked: list[str] = []
    for name, layer in norms:
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            tensor = getattr(layer, buffer)
            if tensor is None:
                continue
            index = index_of_tensor.get(id(tensor))
            if index is not None:
                statistics.append((layer, buffer, index))
            elif buffer != "num_batches_tracked":  # a count left out holds no statistic
                untracked.append(f"{name}.{buffer}" if name else buffer)
    if untracked:
        shown = ", ".join(repr(name) for name in untracked[:6]) + (", ..." if len(untracked) > 6 else "")
        raise ValueError(
            f"update_bn writes the new statistics into the EMA's averages of the BatchNorm buffers, and the EMA does"
            f" not track {shown} (left out by `include`/`exclude`): there is no EMA copy to hold them. Track those"
            " buffers, or recompute their statistics on a copy of the model with torch.optim.swa_utils.update_bn"
        )
    run = forward if forward is not None else _default_forward(module)
    try:
        batches = iter(loader) if max_batches is None else itertools.islice(loader, max_batches)
    except TypeError as error:
        raise TypeError(
            f"`loader` must be an iterable of batches (a DataLoader), got {type(loader).__name__}"
        ) from error
    flags = [(submodule, submodule.training) for submodule in module.modules()]
    momenta = [(layer, layer.momentum) for _, layer in norms]
    count = 0
    scaled.swap_in()
    try:
        module.eval()
        for _, layer in norms:
            layer.reset_running_stats()
            layer.momentum = None  # a cumulative average over the batches
            layer.train()
        for batch in batches:
            run(batch)
            count += 1
        new = [(index, getattr(layer, buffer).detach().clone()) for layer, buffer, index in statistics]
    finally:
        for submodule, training in flags:
            submodule.training = training
        for layer, momentum in momenta:
            layer.momentum = momentum
        scaled.swap_out()  # the training weights and buffers, bit for bit
    if count == 0:
        raise ValueError(
            "update_bn: `loader` yielded no batch, so there are no statistics to compute: pass the training data"
            " (e.g. the training DataLoader); the EMA was left as it was"
        )
    for index, value in new:
        averager.averages[index].copy_(value)
    return count


def _default_forward(module: torch.nn.Module) -> Callable[[Any], Any]:
    """``module(batch)``, ``module(batch[0])`` or ``module(**batch)``, the batch's tensors moved to the module."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    device = first.device if first is not None else None

    def moved(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) and device is not None else value

    def run(batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return module(moved(batch))
        if isinstance(batch, (list, tuple)) and batch:
            return module(moved(batch[0]))
        if isinstance(batch, Mapping):
            return module(**{key: moved(value) for key, value in batch.items()})
        raise TypeError(
            f"update_bn's default `forward` runs the module on a tensor batch, on the first item of a list or tuple,"
            f" or as `module(**batch)` for a dict, and got a {type(batch).__name__}: pass `forward=`, a callable of"
            " one batch that runs the module (e.g. `lambda batch: model(batch['image'].cuda())`)"
        )

    return run
