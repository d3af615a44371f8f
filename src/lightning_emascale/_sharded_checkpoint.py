"""Where the EMA goes in a Lightning checkpoint, and how it comes back: unsharded (:func:`put_ema`), and the EMA of
a sharded module under Lightning's ``ModelParallelStrategy`` and ``FSDPStrategy`` (:func:`put_sharded_ema`);
:func:`load_ema` reads either back when a fit resumes.

Unsharded, with ``evaluate_with_ema``, the checkpoint's ``state_dict`` holds the EMA (for ``load_from_checkpoint``)
and the callback's state the training weights (``"raw_state_dict"``, for ``fit(ckpt_path=...)``).

Each rank averages its own shards (:mod:`lightning_emascale._sharded`); a checkpoint must give every rank its own
shards back, also at another world size. The strategy writes two kinds:

- **full** (``save_distributed_checkpoint=False``): one file, written by rank 0 and read whole by every rank. The
  EMA is gathered (every rank takes part, one tensor at a time) and stored as in an unsharded run: the callback
  state's ``"ema"``, and with ``evaluate_with_ema`` the checkpoint's ``state_dict`` (the EMA, for
  ``load_from_checkpoint``) with the training weights in ``"raw_state_dict"``. Each rank slices its shards back
  out, so it resumes on any number of processes, or on one without sharding.
- **distributed** (a folder written by ``torch.distributed.checkpoint``, DCP): only the model's and the optimizers'
  tensors are written shard by shard; the callback state is pickled by rank 0 alone. The EMA therefore goes
  beside the model's tensors, under ``"{prefix}ema.<name>"`` (and the training weights under
  ``"{prefix}raw.<name>"`` when the model's entries hold the EMA), and is read back here from the same folder
  (:func:`load_sharded_ema`). DCP stores each tensor by its global shape and the offsets of the saved pieces, and
  reshards on load into whatever the destination holds: a ``DTensor`` laid out like this run's parameter (FSDP2 on
  another mesh: 2 ranks to 1 and back tested), or a plain tensor, read whole (an unsharded module).
  What cannot be mapped is refused before anything is written: a checkpoint without the EMA of a tensor this run
  averages, or one of another global shape. Lightning itself reads such a folder only under
  ``ModelParallelStrategy`` (into a module with ``DTensor`` parameters, a 1-rank mesh included) and
  ``FSDPStrategy``; an EMA not yet built when the checkpoint is read (a strategy that restores before
  ``on_fit_start``) is refused with what to use instead.

Under FSDP1 a rank's piece of a parameter is a slice of a flat parameter, with no global layout of its own: the
EMA goes through FSDP1's own state dicts instead, swapped into the shards (a copy, exact for the fp32 parameters
FSDP1 trains; the core refuses an fp32 EMA of low-precision FSDP1 parameters), in either kind. Its sharded state
dict holds ``ShardedTensor``s of the current world size, which DCP reshards alike.
"""

from __future__ import annotations

from typing import Any, Optional, cast

import torch
from torch import Tensor

from lightning_emascale._lightning import swap_ema_into
from lightning_emascale._polyak import PolyakEMA
from lightning_emascale._sharded import FSDP1, full_value, global_view, local_piece_of
from lightning_emascale.core import ScaledEMA


def put_ema(ema: ScaledEMA, checkpoint: dict[str, Any], state: Optional[dict[str, Any]]) -> None:
    """Unsharded: the EMA into the checkpoint's ``state_dict``, the training weights into ``state`` (this callback's
    entry; ``None`` in a weights-only checkpoint, which keeps only the EMA)."""
    raw_state = swap_ema_into(checkpoint["state_dict"], ema.ema_state_dict(), ema.raw_state_dict())
    if state is not None:
        state["raw_state_dict"] = raw_state


def put_sharded_ema(
    ema: ScaledEMA, strategy: Any, checkpoint: dict[str, Any], state: Optional[dict[str, Any]], prefix: str,
    swap: bool, keep: bool,
) -> None:  # fmt: skip
    """A sharded EMA into a checkpoint being written, in the kind the strategy writes (every rank: a collective).
    Arguments as :func:`save_sharded_ema`."""
    if ema.fsdp1_root is not None:
        save_fsdp1_ema(ema, strategy, state, checkpoint["state_dict"], prefix, swap, keep)
        return
    distributed = writes_distributed_checkpoint(strategy)
    save_sharded_ema(ema, state, checkpoint["state_dict"], distributed, prefix, swap, keep)


def load_ema(ema: Optional[ScaledEMA], module: torch.nn.Module, state: dict[str, Any], path: Any) -> None:
    """A fit resuming from the checkpoint at ``path`` whose entry for this callback is ``state``: read the sharded
    EMA back (every rank its own shards; it then lies in ``state["ema"]`` for ``load_state_dict``), and the training
    weights where the checkpoint's model entries hold the EMA."""
    if ema is not None and ema.fsdp1_root is not None and ("ema" in state or "sharded_ema_in_state_dict" in state):
        load_fsdp1_ema(ema, state, path, fitting=True)
        return
    if "sharded_ema_in_state_dict" in state:
        if ema is None:  # the strategy restored the checkpoint before on_fit_start, which builds the EMA
            raise RuntimeError(
                "The checkpoint is a distributed one (a folder; the EMA lies beside the model's tensors), and the"
                " strategy restored it before this callback built its EMA: resume it under ModelParallelStrategy"
                " (FSDP2 `fully_shard`, on any number of processes, one included) or FSDPStrategy, which restore"
                " after the model is set up, at any world size; under another strategy, resume from a full"
                " checkpoint (`save_distributed_checkpoint=False`, or FSDPStrategy's `state_dict_type='full'`)"
            )
        load_sharded_ema(ema, state, path, "state_dict")
        return
    raw = state.get("raw_state_dict")
    if raw is None:
        return
    if ema is not None and ema.is_sharded:
        write_raw(ema, raw)  # each rank its own shards of the full training weights
    else:
        # Resume from the training weights, not from the EMA that "state_dict" holds.
        result = module.load_state_dict(raw, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"The checkpoint's training weights do not fit the model: {result.unexpected_keys}")


def writes_distributed_checkpoint(strategy: Any) -> bool:
    """Whether the strategy saves a distributed (sharded) checkpoint rather than one full file."""
    return bool(getattr(strategy, "_save_distributed_checkpoint", False)) or (
        getattr(strategy, "_state_dict_type", None) == "sharded"  # FSDPStrategy
    )


def _polyak(ema: ScaledEMA) -> Optional[PolyakEMA]:
    """The Polyak copy whose tensors go into the checkpoint; ``None`` in teacher mode (the teachers are the
    module's own entries, which the strategy saves)."""
    return cast(PolyakEMA, ema.averager) if ema.swappable else None


def save_sharded_ema(
    ema: ScaledEMA, state: Optional[dict[str, Any]], model_state: dict[str, Any], distributed: bool, prefix: str,
    swap: bool, keep: bool,
) -> None:  # fmt: skip
    """Put a sharded EMA into a checkpoint being written, on every rank (the full kind gathers: a collective).

    ``state``: this callback's state in the checkpoint (``None`` in a weights-only checkpoint), whose ``"ema"``
    holds ``DTensor`` views; ``model_state``: the checkpoint's ``state_dict`` (sharded, or full on rank 0 and empty
    elsewhere); ``swap``: put the EMA into the model's entries (``evaluate_with_ema``); ``keep``: this rank's
    gathered tensors are written (rank 0).
    """
    averager = _polyak(ema)
    if averager is None:
        return  # teacher mode: the teachers are the module's own entries, which the strategy saves
    views = averager.averages_by_name()  # every name, DTensor views of this rank's shards
    # The training weights: the module's own entries, unless the EMA is swapped in now (the module then holds the
    # EMA, and the training weights are the swap's backup).
    swapped = averager.is_swapped
    if distributed:
        raws = averager.raw_by_name() if swapped else dict(model_state)
        raw = swap_ema_into(model_state, views, raws) if swap else {}
        if swapped and not swap:
            _put_back(model_state, raws)
        _put_beside(model_state, state, prefix, {name: views[name] for name in averager.names}, raw, swap)
        return
    full = _gathered(averager, views, keep)
    by_name = {name: full[averager.names[index]] for name, index in averager.index_of_name.items()} if keep else {}
    raws = dict(model_state)
    if swapped:
        gathered = _gathered(averager, averager.raw_by_name(), keep)
        raws = {name: gathered[averager.names[index]] for name, index in averager.index_of_name.items()} if keep else {}
    _put_full(model_state, state, full, by_name, raws, swap, swapped, keep)


def _put_full(
    model_state: dict[str, Any], state: Optional[dict[str, Any]], first: dict[str, Any], by_name: dict[str, Any],
    raws: dict[str, Any], swap: bool, swapped: bool, keep: bool,
) -> None:  # fmt: skip
    """Full kind: the gathered EMA (``first``: by first names) into the callback state; with ``swap`` into the
    model's entries too (``by_name``: every name), the training weights ``raws`` kept in the callback state; saved
    while swapped without ``swap``, the training weights back into the model's entries. ``keep``: the writing rank."""
    if state is not None:
        state["ema"] = first
    if swap and keep:
        replaced = swap_ema_into(model_state, by_name, raws)
        if state is not None:
            state["raw_state_dict"] = replaced
    elif swapped and keep:
        _put_back(model_state, raws)


def _put_beside(
    model_state: dict[str, Any], state: Optional[dict[str, Any]], prefix: str, averages: dict[str, Any],
    raw: dict[str, Any], swap: bool,
) -> None:  # fmt: skip
    """Distributed kind: the EMA (and the training weights the model's entries no longer hold) beside the model's
    entries, which the strategy writes shard by shard; the callback state says where they are."""
    model_state.update({f"{prefix}ema.{key}": value for key, value in averages.items()})
    model_state.update({f"{prefix}raw.{key}": value for key, value in raw.items()})
    if state is not None:
        del state["ema"]
        state["sharded_ema_in_state_dict"] = prefix
        state["model_holds_ema"] = swap


def _gathered(averager: PolyakEMA, views: dict[str, Tensor], keep: bool) -> dict[str, Tensor]:
    """Each tracked tensor of ``views`` whole, by first name, one gather at a time (every rank takes part), kept
    on the CPU by the writing rank only (``keep``)."""
    full: dict[str, Tensor] = {}
    for name in averager.names:
        value = full_value(views[name])
        if keep:
            full[name] = value.cpu()
    return full


def _put_back(model_state: dict[str, Any], raws: dict[str, Tensor]) -> None:
    """The training weights into the model's entries (saved while the EMA was swapped in), in the entries' dtype."""
    for key, value in raws.items():
        if key in model_state:
            model_state[key] = value.to(model_state[key].dtype)


def save_fsdp1_ema(
    ema: ScaledEMA, strategy: Any, state: Optional[dict[str, Any]], model_state: dict[str, Any], prefix: str,
    swap: bool, keep: bool,
) -> None:  # fmt: skip
    """FSDP1: put the EMA into a checkpoint being written, in the kind the strategy writes, through its own state
    dict of the module with the EMA swapped into the shards (every rank: a collective). Arguments as
    :func:`save_sharded_ema`."""
    averager = _polyak(ema)
    if averager is None:
        return

    def module_state() -> dict[str, Any]:
        return {key: _owned(value) for key, value in strategy.lightning_module_state_dict().items()}

    swapped = averager.is_swapped  # saved during an evaluation: the module holds the EMA, the backup the weights
    if swapped:
        ema.swap_out()
        raws = module_state()
        ema.swap_in()
        ema_state = module_state()
    else:
        raws = dict(model_state)
        with ema.swapped():
            ema_state = module_state()
    names = averager.index_of_name
    averages = {key: value for key, value in ema_state.items() if key in names}
    if writes_distributed_checkpoint(strategy):
        raw = {key: raws[key] for key in averages if key in raws} if swap else {}
        if swap:
            model_state.update(averages)
        elif swapped:
            _put_back(model_state, raws)
        _put_beside(model_state, state, prefix, averages, raw, swap)
        return
    first = {key: value for key, value in averages.items() if key in averager.names} if keep else {}
    _put_full(model_state, state, first, averages, raws, swap, swapped, keep)


def _owned(value: Any) -> Any:
    """A state-dict value that does not share memory with the module (a sharded one may view the live shards)."""
    local_shards = getattr(value, "local_shards", None)
    if callable(local_shards):  # a ShardedTensor: its local shards are replaced by copies
        for shard in local_shards():
            shard.tensor = shard.tensor.clone()
        return value
    return value.clone() if isinstance(value, Tensor) else value


@torch.no_grad()
def load_fsdp1_ema(ema: ScaledEMA, state: dict[str, Any], path: Any, fitting: bool) -> None:
    """FSDP1: read the EMA (and the training weights, where the checkpoint's model entries held the EMA) back,
    every rank its own shards, through FSDP1's own loading of the module; ``state["ema"]`` then holds this rank's
    EMA for ``load_state_dict``."""
    from torch.distributed.fsdp import FullStateDictConfig, ShardedStateDictConfig, StateDictType

    averager = _polyak(ema)
    root = ema.fsdp1_root
    assert averager is not None and root is not None
    fsdp1: Any = FSDP1
    ema.reshard()
    backup = [tensor.detach().clone() for tensor in averager.tracked]
    if "sharded_ema_in_state_dict" in state:
        import torch.distributed.checkpoint as dcp

        prefix = state.pop("sharded_ema_in_state_dict")

        def context() -> Any:  # a new one per use: it cannot be entered twice
            return fsdp1.state_dict_type(root, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig())

        def template(kind: str) -> dict[str, Any]:  # tensors of their own to load into, laid out as the model's
            with context():
                state = root.state_dict()
            return {f"{prefix}{kind}.{key}": _owned(v) for key, v in state.items() if key in averager.index_of_name}

        raw_keys = _raw_keys(path, "model", prefix)
        loaded = template("ema")
        if raw_keys:
            loaded.update({key: value for key, value in template("raw").items() if key in raw_keys})
        dcp.load({"model": loaded}, checkpoint_id=path)
        averages = {key[len(f"{prefix}ema.") :]: v for key, v in loaded.items() if key.startswith(f"{prefix}ema.")}
        raw = {key[len(f"{prefix}raw.") :]: v for key, v in loaded.items() if key.startswith(f"{prefix}raw.")}
    else:

        def context() -> Any:
            return fsdp1.state_dict_type(root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False))

        averages, raw = state["ema"], state.get("raw_state_dict") or {}
    with context():
        root.load_state_dict(averages, strict=False)
    ema.reshard()
    for average, tensor in zip(averager.averages, averager.tracked):
        average.copy_(tensor)
    if raw and fitting:
        with context():
            root.load_state_dict(raw, strict=False)
    else:
        for tensor, value in zip(averager.tracked, backup):
            tensor.copy_(value)
    ema.reshard()
    state["ema"] = {name: average.clone() for name, average in zip(averager.names, averager.averages)}
    state.pop("raw_state_dict", None)


def load_sharded_ema(ema: ScaledEMA, state: dict[str, Any], path: Any, top_key: str) -> None:
    """Read an EMA (and the training weights, if the model's entries held the EMA) back from the distributed
    checkpoint at ``path``, saved at any world size: DCP reshards each saved tensor into a ``DTensor`` laid out like
    this run's parameter (every rank its own shards), or reads it whole into a plain tensor (an unsharded tensor,
    or an unsharded module). The EMA goes into ``state["ema"]`` for ``load_state_dict``.

    Raises ``ValueError`` in teacher mode (the checkpoint holds a Polyak EMA), ``KeyError`` when the checkpoint
    lacks the EMA of a tensor this EMA averages and ``ValueError`` when it holds one of another global shape; then
    nothing is read or written."""
    averager = _polyak(ema)
    if averager is None:
        raise ValueError(
            "The checkpoint holds a Polyak EMA (saved beside the model's tensors), but this EMA is in teacher"
            " mode: load it with the same `teachers` setting it was saved with"
        )
    import torch.distributed.checkpoint as dcp

    prefix = state["sharded_ema_in_state_dict"]

    def like(tensor: Tensor, source: Optional[Tensor]) -> Tensor:
        empty = torch.empty_like(tensor)
        return empty if source is None else global_view(empty, source)

    pieces = zip(averager.names, averager.averages, averager.sources)
    averages = {f"{prefix}ema.{name}": like(average, source) for name, average, source in pieces}
    saved = _saved_shapes(path, top_key, prefix)
    raws = {
        f"{prefix}raw.{name}": like(t, s)
        for name, t, s in zip(averager.names, averager.tracked, averager.sources)
        if f"{prefix}raw.{name}" in saved
    }
    _check_saved(path, saved, prefix, averages)
    del state["sharded_ema_in_state_dict"]
    loaded = {top_key: {**averages, **raws}}
    dcp.load(loaded, checkpoint_id=path)
    state["ema"] = {name: loaded[top_key][f"{prefix}ema.{name}"] for name in averager.names}
    if raws:
        write_raw(ema, {key[len(f"{prefix}raw.") :]: value for key, value in loaded[top_key].items() if key in raws})


def _saved_shapes(path: Any, top_key: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """The global shape of each tensor a distributed checkpoint holds beside the model's (``"{prefix}ema.<name>"``
    and ``"{prefix}raw.<name>"``), by its key under ``top_key``."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(path).read_metadata()
    start = f"{top_key}.{prefix}"
    return {
        key[len(top_key) + 1 :]: tuple(entry.size)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(start) and hasattr(entry, "size")
    }


def _check_saved(path: Any, saved: dict[str, tuple[int, ...]], prefix: str, averages: dict[str, Tensor]) -> None:
    """Raise unless the distributed checkpoint at ``path`` (``saved``: its shapes) holds every EMA tensor of
    ``averages`` (``"{prefix}ema.<name>"``: the ``DTensor``s or plain tensors to load into) with the same global
    shape (the training weights beside them were saved with the EMA's). DCP maps any split of a tensor onto any
    other, but not one shape onto another."""
    start = f"{prefix}ema."
    missing = sorted(key[len(start) :] for key in averages if key not in saved)
    if missing:
        more = " and more" if len(missing) > 5 else ""
        raise KeyError(
            f"The distributed checkpoint at {path} lacks the EMA of {missing[:5]}{more}, which this callback"
            " averages: was it written for another model, or with other `include`/`exclude`?"
        )
    for key, tensor in averages.items():
        if saved[key] != tuple(tensor.shape):
            raise ValueError(
                f"The distributed checkpoint at {path} holds the EMA of {key[len(start) :]!r} with shape"
                f" {saved[key]}; the model's is {tuple(tensor.shape)}: a checkpoint resumes at another world size"
                " or layout, not with another shape, so resume it with the model it was saved from"
            )


def _raw_keys(path: Any, top_key: str, prefix: str) -> set[str]:
    """The training-weight entries a distributed checkpoint holds beside the model's (none without the swap)."""
    return {key for key in _saved_shapes(path, top_key, prefix) if key.startswith(f"{prefix}raw.")}


@torch.no_grad()
def write_raw(ema: ScaledEMA, raw: dict[str, Tensor]) -> None:
    """Write saved training weights (full tensors, or ``DTensor``s laid out like the parameters) into the sharded
    module's tensors, every rank its own shards; then reshard, so the next forward gathers them."""
    averager = _polyak(ema)
    assert averager is not None
    for name, tensor, source in zip(averager.names, averager.tracked, averager.sources):
        if name in raw:
            value = raw[name] if source is None else local_piece_of(raw[name], source, name)
            tensor.copy_(value)
    ema.reshard()
