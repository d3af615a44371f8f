"""Small helpers shared by the Lightning adapters (the two callbacks)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
import stat
import tempfile
import uuid
import weakref
from collections.abc import Callable
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch.utils.data import DataLoader

from lightning_emascale._sharded import is_fsdp1, is_sharded
from lightning_emascale._zero import is_zero3


def is_one_of(instance: Any, classes: tuple[type, ...]) -> bool:
    """``isinstance`` by class name too, so the twins from the standalone ``pytorch_lightning`` package count.

    Its Trainer runs these callbacks as they are (lightly's examples use it); only the class objects differ.
    """
    names = {cls.__name__ for cls in classes}
    return isinstance(instance, classes) or any(cls.__name__ in names for cls in type(instance).__mro__)


def data_parallel_size(trainer: pl.Trainer) -> int:
    """The processes that train on different samples: the strategy's sampler replicas (tensor-parallel ranks share
    their samples), or the world size where the strategy names none."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("num_replicas", trainer.world_size))


def derive_total_samples(trainer: Optional[pl.Trainer]) -> tuple[Optional[int], str]:
    """``max_epochs`` × samples per epoch × data-parallel size, or ``None`` and the reason it cannot be derived."""
    if trainer is None:
        return None, "fit has not started"
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        return None, f"`max_epochs` is not set, the run is bounded by `max_steps`={trainer.max_steps}"
    if trainer.max_steps != -1 and not trainer.fast_dev_run:  # type: ignore[attr-defined]  # a smoke test: one step
        progressive = any(type(c).__name__ == "ProgressiveBatchCallback" for c in trainer.callbacks)  # type: ignore[attr-defined]
        if not trainer.lightning_module.automatic_optimization or progressive:
            return None, (
                f"`max_steps`={trainer.max_steps} is set and the steps per epoch are not fixed"
                " (manual optimization counts every optimizer's step; a ProgressiveBatchCallback changes them)"
            )
        batches = trainer.num_training_batches
        epoch_steps = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else math.inf
        if trainer.max_steps < trainer.max_epochs * epoch_steps:
            return None, (
                f"`max_steps`={trainer.max_steps} stops the run before `max_epochs`={trainer.max_epochs}"
                f" ({trainer.max_epochs} x {epoch_steps} steps)"
            )
    limited = trainer.limit_train_batches != 1.0 or trainer.overfit_batches  # type: ignore[attr-defined]
    if limited and not trainer.fast_dev_run:  # type: ignore[attr-defined]  # a smoke test needs a clock only
        return None, "`limit_train_batches` or `overfit_batches` is set"
    loader = trainer.train_dataloader
    if loader is None:
        return None, "the train dataloader is not loaded yet"
    if not isinstance(loader, torch.utils.data.DataLoader):
        return None, f"the train dataloader is a {type(loader).__name__}, not a single DataLoader"
    batch_sampler = loader.batch_sampler
    # A BatchSampler (torch's, or a subclass such as torchdata's stateful one) forms `batch_size` batches of its
    # sampler's indices; another batch sampler may yield any number of samples per epoch.
    if batch_sampler is not None and not isinstance(batch_sampler, torch.utils.data.BatchSampler):
        return None, (
            f"the train dataloader's `batch_sampler` is a {type(batch_sampler).__name__}, whose batches may hold any"
            " number of samples"
        )
    sampler = getattr(batch_sampler, "sampler", loader.sampler)
    if isinstance(loader.dataset, torch.utils.data.IterableDataset) or not hasattr(sampler, "__len__"):
        return None, "the train dataset has no length (an IterableDataset)"
    per_epoch = len(sampler)  # type: ignore[arg-type]
    if isinstance(batch_sampler, torch.utils.data.BatchSampler) and batch_sampler.drop_last:
        per_epoch -= per_epoch % batch_sampler.batch_size  # the last, partial batch is dropped
    return trainer.max_epochs * per_epoch * data_parallel_size(trainer), ""


class RunLength:
    """The training samples of a Trainer's run, for the sample clock: derived from the Trainer once per epoch.

    Callable: returns the total or raises ``ValueError`` saying why it cannot be derived and what to pass.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner  # the class whose `total_samples=` the error message points to
        self.trainer: Optional[pl.Trainer] = None
        self._this_epoch: Optional[int] = None

    def __call__(self) -> int:
        # It does not depend on the batch size, so it also holds between a ProgressiveBatchCallback's loader
        # reset and the next epoch's rebuild.
        if self._this_epoch is None:
            total, reason = derive_total_samples(self.trainer)
            if total is None:
                raise ValueError(
                    f"Cannot derive `total_samples` from the Trainer ({reason}): pass `total_samples=` to"
                    f" {self.owner}, the number of training samples (global, all devices) the run will see"
                )
            self._this_epoch = total
        return self._this_epoch

    def start_epoch(self, trainer: pl.Trainer, total_samples: Optional[int], check: bool) -> None:
        """Forget the last epoch's value; with ``check``, fail now if the total is unknown or too small."""
        self.trainer, self._this_epoch = trainer, None
        if not check:
            return
        total = total_samples or self()  # raises now, not at the first step, when it cannot be derived
        derived, _ = derive_total_samples(trainer)
        if total_samples is not None and derived is not None and trainer.max_steps == -1 and derived > total:
            assert trainer.max_epochs is not None
            raise ValueError(
                f"`total_samples`={total} is less than the {derived} samples this run trains on (max_epochs"
                f" {trainer.max_epochs} x {derived // trainer.max_epochs} per epoch): raise it, or drop it to derive it"
            )


def is_sharded_module(trainer: pl.Trainer, module: torch.nn.Module) -> bool:
    """Whether the fit shards ``module`` (``DTensor`` parameters, ZeRO-3 partitions, or an FSDP1 wrapper around it)."""
    wrapped = trainer.strategy.model
    return (wrapped is not None and is_fsdp1(wrapped)) or any(is_sharded(p) or is_zero3(p) for p in module.parameters())


def optimizer_steps_taken(trainer: pl.Trainer) -> int:
    """The optimizer steps taken so far: DeepSpeed's engine counts its own (it accumulates gradients itself, across
    epochs, where Lightning's ``global_step`` follows its loop's windows); ``global_step`` otherwise."""
    if uses_deepspeed(trainer):
        return int(trainer.strategy.deepspeed_engine.global_steps)  # type: ignore[attr-defined]
    return trainer.global_step


def uses_deepspeed(trainer: pl.Trainer) -> bool:
    """Whether the Trainer's strategy is DeepSpeed (it writes its own checkpoint directory, without ``state_dict``)."""
    return is_one_of(trainer.strategy, (DeepSpeedStrategy,))


def swap_ema_into(model_state: dict[str, Any], averages: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """Replace the tracked entries of a checkpoint's ``state_dict`` by their EMA (in the entry's dtype).

    Returns the training values that were replaced, by name; tied tensors stay shared, so they are saved once.
    """
    replaced = {}
    for key, average in averages.items():
        if key in model_state:
            replaced[key] = raw[key]
            model_state[key] = average.to(model_state[key].dtype)
    return replaced


def check_first_batch(loader: Any, measured: int) -> None:
    """Raise if the first batch of a fit holds another number of samples than the dataloader's ``batch_size``.

    A mismatch means the batch was measured from the wrong entry (or a collate function changed it): kappa would
    be off by that factor for the whole run. A dataset shorter than one batch is fine.
    """
    if not isinstance(loader, DataLoader) or loader.batch_size is None or measured == loader.batch_size:
        return
    sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
    sized = hasattr(sampler, "__len__") and not isinstance(loader.dataset, torch.utils.data.IterableDataset)
    if measured < loader.batch_size and (not sized or len(sampler) < loader.batch_size):  # type: ignore[arg-type]
        return  # a dataset (or an iterable's shard) smaller than one batch
    raise ValueError(
        f"The first batch measures {measured} samples, but the train dataloader's `batch_size` is"
        f" {loader.batch_size}: kappa would be counted from the wrong dimension. Override"
        " `EMAScalingCallback.batch_size_of(batch)` to return the samples in one micro-batch on this device"
    )


def spawned_workers(trainer: pl.Trainer) -> bool:
    """Whether fit runs in processes started for it (``ddp_spawn``, ``ddp_notebook``), whose state is lost after."""
    return type(getattr(trainer.strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher"


class WeightsOnlyCheckpointHook:
    """Stands in for a LightningModule's ``on_save_checkpoint`` during fit, to reach weights-only checkpoints.

    Lightning calls no callback hook for ``save_checkpoint(weights_only=True)`` (``ModelCheckpoint(
    save_weights_only=True)``), only the module's: this calls ``write`` on such a checkpoint (one without
    ``"callbacks"``), then the module's own hook. A copy or a pickle of the module gets the module's own hook back.
    """

    def __init__(self, module: pl.LightningModule, write: Callable[[dict[str, Any]], None]) -> None:
        self.module = module
        self.write = write
        self.previous = module.__dict__.get("on_save_checkpoint")  # an instance attribute set before, if any

    @classmethod
    def install(cls, module: pl.LightningModule, write: Callable[[dict[str, Any]], None]) -> WeightsOnlyCheckpointHook:
        hook = cls(module, write)
        module.on_save_checkpoint = hook  # type: ignore[method-assign]
        return hook

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        if "callbacks" not in checkpoint:
            self.write(checkpoint)  # first: the module's hook sees the EMA, as in a full checkpoint
        own = self.previous or type(self.module).on_save_checkpoint.__get__(self.module)
        own(checkpoint)

    def remove(self) -> None:
        if self.module.__dict__.get("on_save_checkpoint") is self:
            if self.previous is None:
                del self.module.__dict__["on_save_checkpoint"]
            else:
                self.module.__dict__["on_save_checkpoint"] = self.previous

    def __reduce__(self) -> Any:
        return (getattr, (self.module, "on_save_checkpoint"))  # not pickled along: resolves to the copy's own


class SpawnedFitFile:
    """Carries a Polyak EMA out of ``ddp_spawn`` fit workers to later evaluation workers, through a file.

    Fit's workers exit with their state; a later ``validate/test/predict`` spawns new workers from the main
    process's copy of the callback, which never held an EMA. Local rank 0 of fit writes the EMA and a fingerprint
    of the training weights (one hash per tensor) to a path fixed when the callback was built, so every copy of it
    finds the file (a deep copy gets a file of its own); the main process deletes the file when it exits.

    Nothing is touched on disk unless fit runs in spawned workers. The file lives in a directory of this user's own
    (mode 0700) under the temporary directory, is created 0600 through a unique temporary name and renamed into
    place; its name holds the host and the main process's id, so that files left on this host by a process killed
    before it could delete them are removed when the next spawned fit starts.
    """

    def __init__(self) -> None:
        name = f"{_SPAWN_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex}.pt"
        self.path = os.path.join(spawn_directory(create=False), name)
        weakref.finalize(self, _remove, self.path)

    def __reduce__(self) -> Any:
        return (_SpawnedFitFileCopy, (self.path,))  # a worker's copy does not delete the file when it exits

    def __deepcopy__(self, memo: dict[int, Any]) -> SpawnedFitFile:
        return SpawnedFitFile()  # a copied callback is another run

    def clear(self, trainer: pl.Trainer) -> None:
        """At the start of a spawned fit: an earlier fit's file must not stand in for this one's; files of killed
        processes on this host go too."""
        if trainer.local_rank == 0:
            remove_stale_spawn_files(spawn_directory(create=True))
            _remove(self.path)

    def write(self, trainer: pl.Trainer, state: dict[str, Any], raw: dict[str, torch.Tensor]) -> None:
        if trainer.local_rank != 0:  # every node: evaluation workers read the file on their own machine
            return
        directory = spawn_directory(create=True)
        handle, partial = tempfile.mkstemp(dir=directory, prefix=f"{_PARTIAL_PREFIX}{_host()}-{os.getpid()}-")
        try:  # mkstemp creates it 0600
            with os.fdopen(handle, "wb") as file:
                torch.save({"state": state, "fingerprint": fingerprint(raw)}, file)  # hashes: plain strings
            os.replace(partial, self.path)
        except BaseException:
            _remove(partial)
            raise

    def exists(self) -> bool:
        """Whether a spawned fit left its EMA in the file (this process did not hold it)."""
        return os.path.exists(self.path)

    def read(self, device: torch.device) -> Optional[dict[str, Any]]:
        if not os.path.exists(self.path):
            return None
        return torch.load(self.path, map_location=device, weights_only=True)


class _SpawnedFitFileCopy(SpawnedFitFile):
    def __init__(self, path: str) -> None:  # no finalizer: the main process's object owns the file
        self.path = path


_SPAWN_PREFIX = "spawned-fit-"
_PARTIAL_PREFIX = ".partial-"  # a file being written


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def spawn_directory(create: bool) -> str:
    """This user's directory for the files that carry an EMA out of ``ddp_spawn`` workers; with ``create``, made
    (or tightened to) 0700, and refused if it is a link, not a directory, or another user's."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    directory = os.path.join(tempfile.gettempdir(), f"lightning_emascale-{user}")
    if not create:
        return directory
    fix = "remove it, or point TMPDIR at another temporary directory"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as error:
        raise RuntimeError(
            f"Cannot make {directory!r}, where ddp_spawn's workers leave the EMA for later evaluations ({error}): {fix}"
        ) from error
    if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        raise RuntimeError(
            f"{directory!r}, where ddp_spawn's workers leave the EMA for later evaluations, is a link, a file or"
            f" another user's: {fix}"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(directory, 0o700)  # ours, but readable by others: tighten it
    return directory


def remove_stale_spawn_files(directory: str) -> None:
    """Delete the files of this host's processes that no longer run (killed before they could delete their own)."""
    host = _host()
    for name in os.listdir(directory):  # "<prefix><host>-<pid>-...": the main process's id, or the writer's
        prefix = next((p for p in (_SPAWN_PREFIX, _PARTIAL_PREFIX) if name.startswith(p + host + "-")), None)
        pid = name[len(prefix) + len(host) + 1 :].split("-", 1)[0] if prefix is not None else ""
        if pid.isdigit() and not _running(int(pid)):
            _remove(os.path.join(directory, name))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user (or the platform cannot tell): keep its file
        return True
    return True


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """A hash of every tensor's bytes, by name: equal exactly when the values are (any change, a permutation too)."""

    def digest(tensor: torch.Tensor) -> str:
        return hashlib.blake2b(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        ).hexdigest()

    return {name: digest(tensor) for name, tensor in tensors.items()}


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
