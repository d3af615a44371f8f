"""Teacher mode: move a module's existing teacher submodules toward their online twins (BYOL, DINO, MoCo).

Pure torch, no Lightning. The EMA is a submodule the loss already uses, so nothing is copied and nothing is
swapped: the teachers are the module's own entries in its checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from lightning_emascale._averager import Averager, Update, all_finite
from lightning_emascale._options import EMAOptions
from lightning_emascale._polyak import refuse_polyak_only
from lightning_emascale._sharded import is_sharded, local_piece, storage_moved
from lightning_emascale._zero import full_shape, is_zero3, read_piece, written_piece


def check_options(options: EMAOptions) -> None:
    """Teacher mode's own checks: the teachers are averaged whole, in their own dtype, and swapped nowhere."""
    refuse_polyak_only(options)
    options.check_include()  # an empty include says more than that teacher mode takes none
    if options.ema_precision != "fp32":
        raise ValueError(
            f"`ema_precision`={options.ema_precision!r} has no effect in teacher mode (the teachers keep their own"
            " dtype): drop it"
        )
    for online, teacher in (options.teachers or {}).items():
        if online == teacher:
            raise ValueError(
                f"`teachers` maps {online!r} to itself: the teacher must be a separate, frozen copy"
                f" (e.g. `copy.deepcopy(self.{online}).requires_grad_(False)`)"
            )
    if options.include is not None or options.exclude:
        raise ValueError(
            "`include` and `exclude` choose what the Polyak copy averages; in teacher mode the teachers are"
            " averaged whole: drop them, or map only the submodules you want in `teachers`"
        )


class TeacherEMA(Averager):
    """Moves existing teacher tensors toward their online twins: ``teacher <- decay * teacher + (1 - decay) * online``.

    The teacher mode of BYOL, DINO and MoCo: the EMA is a submodule the loss already uses, so nothing is copied.
    Pairs are grouped by (device, dtype) for one ``_foreach_lerp_`` per group; a pair whose dtypes differ (an fp32
    teacher of a bf16 student) is lerped one tensor at a time.
    """

    writes_module = True  # a teacher left gathered by a sharded forward must gather its moved shards again

    def __init__(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
        self._module: Optional[torch.nn.Module] = None  # set by from_module: then the paths are followed
        self._teachers: dict[str, str] = {}
        self._submodules: list[torch.nn.Module] = []  # the submodules at the paths when they were paired
        self._set_pairs(pairs)

    def _set_pairs(self, sources: Sequence[tuple[Tensor, Tensor]]) -> None:
        #: The (teacher, online) parameters as paired; a sharded pair is moved through its rank-local pieces.
        self.sources = list(sources)
        self._sharded = [index for index, (teacher, _) in enumerate(self.sources) if is_sharded(teacher)]
        self._group([_pieces(teacher, online) for teacher, online in self.sources])

    def _group(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
        #: (teacher, online) tensor pairs.
        self.pairs = list(pairs)
        self.groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        self.mixed: list[tuple[Tensor, Tensor]] = []
        for teacher, online in self.pairs:
            if teacher.dtype != online.dtype or teacher.device != online.device:
                self.mixed.append((teacher, online))
                continue
            teachers, onlines = self.groups.setdefault((teacher.device, teacher.dtype), ([], []))
            teachers.append(teacher)
            onlines.append(online)

    @classmethod
    def from_module(cls, module: torch.nn.Module, teachers: Mapping[str, str]) -> TeacherEMA:
        """Pair the parameters of every teacher submodule of ``module`` with its online twin's.

        ``teachers`` maps online submodule paths to teacher paths. Raises ``ValueError`` when a path is not a
        submodule, a teacher does not mirror its twin (names or shapes) or still requires grad.

        The paths are followed: a submodule replaced at its path (lightly's SMoG swaps in deep copies every few
        hundred steps) is paired again, with the same checks, before the next update.
        """
        state = cls(_pair(module, teachers))
        state._module, state._teachers = module, dict(teachers)
        state._submodules = _at_paths(module, state._teachers)
        return state

    def follow_paths(self) -> None:
        """Pair again if a submodule at one of the paths was replaced since the last pairing, or a sharded
        parameter's local piece moved."""
        if self._module is None:
            return
        current = _at_paths(self._module, self._teachers)
        if any(now is not then for now, then in zip(current, self._submodules)):
            self._set_pairs(_pair(self._module, self._teachers))
            self._submodules = current
            return
        moved = any(  # FSDP2 re-creates a local piece when a parameter is reset (a dtype or device move)
            storage_moved(source, piece)
            for index in self._sharded
            for source, piece in zip(self.sources[index], self.pairs[index])
        )
        if moved:
            self._set_pairs(self.sources)

    def online_tensors(self) -> list[Tensor]:
        """The online tensors the teachers follow (what :func:`all_finite` checks before an update)."""
        self.follow_paths()
        return [online for _, online in self.pairs]

    @torch.no_grad()
    def update(self, step: Update, only_if: Optional[Tensor] = None) -> None:
        """Move every teacher; with ``only_if`` (a 0-d bool tensor) False, leave them as they are (no host sync)."""
        self.follow_paths()
        weight = 1.0 - step.decay
        if only_if is not None:
            for teacher, online in self.pairs:
                teacher.lerp_(torch.where(only_if, online.to(teacher.dtype), teacher), weight)
            return
        for teachers, onlines in self.groups.values():
            torch._foreach_lerp_(teachers, onlines, weight)
        for teacher, online in self.mixed:
            teacher.lerp_(online.to(teacher.dtype), weight)

    def finite(self) -> Tensor:
        return all_finite(self.online_tensors())  # parameters only

    def describe(self) -> str:
        return f"in teacher mode ({dict(self._teachers)})"

    def no_copy(self) -> Exception:
        return RuntimeError(
            "Teacher mode keeps no separate EMA: the EMA weights are the module's teacher submodules"
            f" {sorted(self._teachers.values())}. Use those directly."
        )


class Frozen:
    """The ``requires_grad`` flags that :func:`freeze_teachers` turned off, to :meth:`undo` after a failure."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)

    def undo(self) -> None:
        for tensor in self.tensors:
            tensor.requires_grad_(True)


def freeze_teachers(module: torch.nn.Module, teachers: Mapping[str, str]) -> Frozen:
    """``requires_grad_(False)`` on every teacher submodule (lightly's I-JEPA leaves its target trainable).

    Every other check of the pairing runs first, so a bad mapping raises with nothing frozen. Returns what was
    frozen, so that a caller that fails later can undo it.
    """
    _pair(module, teachers, trainable_ok=True)
    frozen = [
        tensor
        for teacher_path in teachers.values()
        for tensor in _submodule(module, teacher_path).parameters()
        if tensor.requires_grad
    ]
    for tensor in frozen:
        tensor.requires_grad_(False)
    return Frozen(frozen)


def _pieces(teacher: Tensor, online: Tensor) -> tuple[Tensor, Tensor]:
    """The tensors a teacher update writes and reads: a sharded pair's rank-local pieces (ZeRO-3: the teacher's
    partition, and the online partition's fp32 master where it is trained), the tensors themselves otherwise."""
    if is_zero3(teacher):
        return written_piece(teacher), read_piece(online)[0]
    if is_sharded(teacher):
        return local_piece(teacher), local_piece(online)
    return teacher, online


def _at_paths(module: torch.nn.Module, teachers: Mapping[str, str]) -> list[torch.nn.Module]:
    return [_submodule(module, path) for pair in teachers.items() for path in pair]


def _pair(
    module: torch.nn.Module, teachers: Mapping[str, str], trainable_ok: bool = False
) -> list[tuple[Tensor, Tensor]]:
    """The (teacher, online) parameter pairs of ``teachers`` (online path -> teacher path), checked."""
    pairs: list[tuple[Tensor, Tensor]] = []
    follows: dict[str, str] = {}  # teacher path -> the online path it follows
    for online_path, teacher_path in teachers.items():
        if teacher_path in follows:
            raise ValueError(
                f"`teachers` maps both {follows[teacher_path]!r} and {online_path!r} to {teacher_path!r}: each"
                " teacher follows one online module"
            )
        follows[teacher_path] = online_path
        online = dict(_submodule(module, online_path).named_parameters())
        teacher = dict(_submodule(module, teacher_path).named_parameters())
        mirror = f"Teacher {teacher_path!r} does not mirror {online_path!r}"
        if online.keys() != teacher.keys():
            only = sorted(online.keys() ^ teacher.keys())
            raise ValueError(f"{mirror}: parameters {only[:5]} are in only one of them")
        trainable = [f"{teacher_path}.{name}" for name, tensor in teacher.items() if tensor.requires_grad]
        if trainable and not trainable_ok:
            raise ValueError(
                f"Teacher {teacher_path!r} still requires grad ({', '.join(trainable[:3])}, ...): freeze it with"
                f" `self.{teacher_path}.requires_grad_(False)` (lightly: `deactivate_requires_grad`) or pass"
                " `freeze_teachers=True`, so that only the EMA moves it"
            )
        for name, tensor in online.items():
            if full_shape(teacher[name]) != full_shape(tensor):
                raise ValueError(
                    f"{mirror}: `{name}` has shape {full_shape(teacher[name])} in the teacher and"
                    f" {full_shape(tensor)} in the online module"
                )
            _check_sharded_alike(teacher[name], tensor, f"{mirror}: `{name}`")
            pairs.append((teacher[name], tensor))
    onlines = {id(online) for _, online in pairs}
    if any(id(teacher) in onlines for teacher, _ in pairs):
        raise ValueError(
            f"`teachers` {dict(teachers)} overlap: a teacher parameter is also an online one (one path lies inside"
            " another), so the EMA would move the weights it averages"
        )
    return pairs  # sharded twins move shard by shard: TeacherEMA pairs their rank-local pieces


def _check_sharded_alike(teacher: Tensor, online: Tensor, what: str) -> None:
    """Raise ``ValueError`` unless a teacher tensor and its online twin are sharded alike (or both not at all), so
    that each rank's pieces are the same slice of the same parameter."""
    if is_zero3(teacher) != is_zero3(online):
        where = "teacher" if is_zero3(teacher) else "online module"
        raise ValueError(
            f"{what} is partitioned by DeepSpeed ZeRO-3 in the {where} only: keep teacher and online module in the"
            " same DeepSpeed engine, so that each rank holds the same partition of both"
        )
    if not (is_sharded(teacher) or is_sharded(online)):
        return

    def layout(tensor: Tensor) -> str:
        if not is_sharded(tensor):
            return "not sharded"
        local = tuple(local_piece(tensor).shape)
        return f"sharded as {tensor.placements} on {tensor.device_mesh} (local shape {local})"  # type: ignore[attr-defined]

    if layout(teacher) != layout(online):
        raise ValueError(
            f"{what} is {layout(teacher)} in the teacher and {layout(online)} in the online module: shard the"
            " teacher exactly like its online twin (the same `fully_shard`/`parallelize_module` calls, in the same"
            " order), so that each rank holds the same slice of both"
        )


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in module.named_children()]
        raise ValueError(
            f"`teachers` names {path!r}, which is not a submodule of {type(module).__name__}; its children are"
            f" {children}"
        ) from None
