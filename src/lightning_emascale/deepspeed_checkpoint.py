"""One file from a DeepSpeed checkpoint directory, with the EMA put back together from every rank's partition.

Under DeepSpeed, Lightning writes a checkpoint *directory*: the weights and optimizer state in DeepSpeed's files, and
the callbacks' states beside them as DeepSpeed's client state (ZeRO-3: every rank its own, ZeRO-1/2: rank 0's). An
:class:`~lightning_emascale.EMAScalingCallback` keeps its EMA there, and so does a plain DeepSpeed loop that passes
``client_state={"ema": ema.state_dict()}`` to ``engine.save_checkpoint``: under ZeRO-3 each rank's file holds that
rank's pieces, which resume only at the same world size. :func:`consolidate_deepspeed_checkpoint` writes one file
in which the EMA is whole, so that ``Model.load_from_checkpoint`` gives the EMA weights and a
:class:`~lightning_emascale.ScaledEMA` of any layout (one device, another world size) loads the EMA state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lightning_emascale._lightning import swap_ema_into
from lightning_emascale._resume import MODEL_ENTRIES
from lightning_emascale._zero import PARTITIONS_KEY, gather_partitions

__all__ = ["consolidate_deepspeed_checkpoint"]

#: The entries of DeepSpeed's model-states file that are DeepSpeed's own, not the client state (as Lightning drops).
_DEEPSPEED_ENTRIES = frozenset(
    {
        "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
        "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
        "csr_tensor_module_names", "skipped_steps", "global_steps", "global_samples", "dp_world_size",
        "mp_world_size", "ds_config", "ds_version",
    }
)  # fmt: skip


def consolidate_deepspeed_checkpoint(
    checkpoint_dir: Union[str, os.PathLike],
    output_file: Union[str, os.PathLike],
    tag: Optional[str] = None,
    ema_as_weights: bool = True,
) -> dict[str, Any]:
    """Write a DeepSpeed checkpoint directory (ZeRO 1, 2 or 3) as one Lightning checkpoint file, with the EMA whole.

    The training weights are consolidated by DeepSpeed's ``zero_to_fp32`` (in fp32, under ``"state_dict"``) and the
    client state is kept beside them, as Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` does; each EMA
    state (a callback's, or a client-state entry holding ``ScaledEMA.state_dict()``) gets its full EMA, put together
    from every rank's pieces (ZeRO-3). Needs DeepSpeed installed; reads every rank's file on this one process (no
    process group).

    Args:
        checkpoint_dir: the directory ``trainer.save_checkpoint`` (or ``ModelCheckpoint``) wrote.
        output_file: the file to write.
        tag: the checkpoint's tag inside the directory (Lightning writes ``"checkpoint"``); ``None`` reads ``latest``.
        ema_as_weights: put the EMA into the file's ``state_dict`` (``Model.load_from_checkpoint`` then gives the
            EMA weights), and the training weights into the callback state's ``raw_state_dict``, as
            ``evaluate_with_ema`` does in an unsharded checkpoint. False: ``state_dict`` keeps the training weights.
            Needs exactly one Polyak EMA state in the checkpoint.

    Returns:
        The checkpoint written.

    Raises:
        FileNotFoundError: no DeepSpeed checkpoint (or no ``tag``) in ``checkpoint_dir``.
        ValueError: a rank's file is missing or from another step, or ``ema_as_weights`` with no or several EMAs.
        Nothing is written then.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not isinstance(ema_as_weights, bool):
        raise TypeError(f"`ema_as_weights` must be True or False, got {ema_as_weights!r}")
    if not Path(checkpoint_dir).is_dir():
        raise FileNotFoundError(
            f"`checkpoint_dir`={str(checkpoint_dir)!r} is not a directory: pass the directory a DeepSpeed fit saved"
        )
    directory = _tag_directory(Path(checkpoint_dir), tag)
    # The client state (Lightning's entries, the EMA states) of the tag's own files, as Lightning's converter keeps
    # it (which reads it from `latest` whatever the tag); DeepSpeed's own entries dropped.
    rank_zero = directory / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    first = rank_zero if rank_zero.is_file() else directory / "mp_rank_00_model_states.pt"
    if not first.is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no DeepSpeed model states file (mp_rank_00_model_states.pt)")
    checkpoint = {
        key: value
        for key, value in torch.load(first, map_location="cpu", weights_only=False).items()
        if key not in _DEEPSPEED_ENTRIES
    }
    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), directory.name)
    checkpoint["state_dict"] = {name.removeprefix("_forward_module."): value for name, value in weights.items()}
    emas = _ema_states(checkpoint)
    partitioned = {where: state for where, state in emas.items() if PARTITIONS_KEY in state}
    if partitioned:
        ranks = _rank_files(directory, int(next(iter(partitioned.values()))[PARTITIONS_KEY]["world_size"]))
        for where, state in partitioned.items():
            pieces: list[dict[str, Any]] = []
            for rank, rank_file in enumerate(ranks):
                piece = _ema_states(rank_file).get(where)
                if piece is None or PARTITIONS_KEY not in piece:
                    raise ValueError(
                        f"Rank {rank}'s file holds no ZeRO-3 piece of the EMA state {where[-1]!r}: the directory"
                        " mixes checkpoints, or the file was written without this EMA"
                    )
                if piece[PARTITIONS_KEY]["rank"] != rank or piece.get("samples_seen") != state.get("samples_seen"):
                    raise ValueError(
                        f"The EMA state {where[-1]!r} in rank {rank}'s file is not rank {rank}'s piece of the same step"
                        f" (it says rank {piece[PARTITIONS_KEY]['rank']}, {piece.get('samples_seen')} samples seen):"
                        " the directory mixes checkpoints"
                    )
                pieces.append(piece)
            state["ema"] = gather_partitions([piece["ema"] for piece in pieces], state[PARTITIONS_KEY]["shapes"])
            del state[PARTITIONS_KEY]
    if ema_as_weights:
        if len(emas) != 1:
            raise ValueError(
                f"`ema_as_weights=True` puts one EMA into the file's state_dict, and the checkpoint holds"
                f" {len(emas)} EMA states ({sorted(where[-1] for where in emas)}): pass `ema_as_weights=False`"
            )
        state = next(iter(emas.values()))
        model_state = checkpoint["state_dict"]
        state["raw_state_dict"] = swap_ema_into(model_state, state["ema"], dict(model_state))
        state[MODEL_ENTRIES] = "ema"
    # Written only now, after every check, through a temporary file: a refusal leaves no file behind.
    output = Path(output_file)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return checkpoint


def _tag_directory(checkpoint_dir: Path, tag: Optional[str]) -> Path:
    """The directory of the checkpoint ``tag`` (``None``: the one ``latest`` names) inside ``checkpoint_dir``."""
    if tag is None:
        latest = checkpoint_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(
                f"{str(checkpoint_dir)!r} has no `latest` file naming its checkpoint: pass `tag` (Lightning saves"
                " under 'checkpoint')"
            )
        tag = latest.read_text().strip()
    directory = checkpoint_dir / tag
    if not directory.is_dir():
        present = sorted(entry.name for entry in checkpoint_dir.iterdir() if entry.is_dir())
        raise FileNotFoundError(f"`tag`={tag!r} is not a checkpoint in {str(checkpoint_dir)!r}; it holds {present}")
    return directory


def _ema_states(checkpoint: Mapping[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    """The Polyak EMA states (``ScaledEMA.state_dict()`` with its EMA tensors) in a checkpoint, by where they lie:
    a Lightning callback's (``("callbacks", key)``) or a client-state entry of a plain DeepSpeed loop (``(key,)``)."""
    found: dict[tuple[str, ...], dict[str, Any]] = {}
    callbacks = checkpoint.get("callbacks", {})
    for key, state in callbacks.items() if isinstance(callbacks, Mapping) else ():
        if _is_ema_state(state):
            found["callbacks", key] = state
    for key, state in checkpoint.items():
        if _is_ema_state(state):
            found[(key,)] = state
    return found


def _is_ema_state(state: Any) -> bool:
    """Whether a callback's state is a Polyak EMA's (``ScaledEMA.state_dict`` with its EMA tensors)."""
    return isinstance(state, Mapping) and "ema" in state and "samples_seen" in state


def _rank_files(directory: Path, world_size: int) -> list[dict[str, Any]]:
    """Every rank's ZeRO-3 model-state file (its client state), in rank order."""
    states = []
    for rank in range(world_size):
        path = directory / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        if not path.is_file():
            raise ValueError(
                f"{str(path)!r} is missing: the EMA was partitioned over {world_size} ranks, and each rank's file"
                " holds its piece"
            )
        states.append(torch.load(path, map_location="cpu", weights_only=False))
    return states
