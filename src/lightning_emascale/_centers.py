r"""DINO's teacher-output centre made exact under gradient accumulation. Torch only: no Lightning, no lightly.

A DINO loss keeps an EMA of the teacher's outputs, its *centre*, and moves it on every forward pass (lightly's
``DINOLoss.update_center`` and ``Center.update``). Under gradient accumulation that is one update per
micro-batch, each forward seeing a centre its step's earlier micro-batches already moved, where the large-batch run
it stands for uses one centre for the whole step and then makes one update with the mean of all its teacher outputs.
Scaling the momentum per micro-batch (:class:`~lightning_emascale._attributes.MomentumAttribute`) keeps the horizon
in samples but not the step's values; :class:`CenterUpdate` gives them exactly:

.. math::

    c \leftarrow m\,c + (1 - m)\,\bar c, \qquad m = \rho^\kappa, \qquad
    \bar c = \frac{\sum_i b_i\,c_i}{\sum_i b_i}

once per optimizer step, where :math:`c_i` is the centre lightly computes for micro-batch :math:`i` of :math:`b_i`
samples (global), :math:`\rho` the centre's momentum at the base batch and :math:`\kappa` the step's global samples
over the base batch.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch

from lightning_emascale._checks import as_real, check_momentum, check_positive_int
from lightning_emascale.functional import scale_ema_momentum

#: What the objects lightning_emascale can drive look like: ``center`` is a floating-point tensor in both.
_CENTER = "center"


class _Kind(NamedTuple):
    """One shape of centre-keeping object: its update method and its momentum attribute."""

    name: str
    method: str
    momentum: str


_KINDS = (
    _Kind("lightly's DINOLoss", "update_center", "center_momentum"),
    _Kind("lightly's Center", "update", "momentum"),
)


class _Missing(enum.Enum):
    """No value: a sentinel that survives pickling and ``copy.deepcopy`` (an ``object()`` would not)."""

    MISSING = enum.auto()


_MISSING = _Missing.MISSING


def _needs() -> str:
    return " or ".join(
        f"a method `{kind.method}`, a floating-point tensor `{_CENTER}` and a number `{kind.momentum}` ({kind.name})"
        for kind in _KINDS
    )


def _problems(found: Any, kind: _Kind) -> list[str]:
    """What ``found`` lacks to be a centre of ``kind`` (empty: it is one)."""
    problems = []
    if not callable(getattr(found, kind.method, None)):
        problems.append(f"no method `{kind.method}`")
    center = getattr(found, _CENTER, None)
    if not isinstance(center, torch.Tensor):
        problems.append(f"no tensor `{_CENTER}`")
    elif not center.is_floating_point():
        problems.append(f"a {center.dtype} `{_CENTER}`, not floating-point")
    momentum = getattr(found, kind.momentum, _MISSING)
    declared = getattr(type(found), kind.momentum, None)
    if momentum is _MISSING:
        problems.append(f"no `{kind.momentum}`")
    elif as_real(momentum) is None:
        problems.append(f"`{kind.momentum}` = {momentum!r}, not a number")
    elif isinstance(declared, property) and declared.fset is None:
        problems.append(f"`{kind.momentum}`, a read-only property (no setter)")
    return problems


class _Intercept:
    """The update method on the instance while a :class:`CenterUpdate` is attached.

    A plain object rather than a closure, so that a module holding it can still be pickled (``ddp_spawn``) and
    deep-copied (the copy gets a copy of the :class:`CenterUpdate`, driving the copy).
    """

    def __init__(self, update: CenterUpdate) -> None:
        self.update = update

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.update._intercepted(*args, **kwargs)


@dataclass(eq=False)
class CenterUpdate:
    r"""The centre of a DINO loss at ``path`` of a module, moved once per optimizer step as in one large batch.

    While attached, the object's update method (``update_center`` of lightly's ``DINOLoss``, ``update`` of its
    ``Center``) leaves the centre where it is: it runs lightly's own code with the momentum at 0, which returns the
    micro-batch's centre (all-reduced over DDP ranks where lightly does it), puts the centre back and adds that
    centre, weighted by the micro-batch's global samples given to :meth:`micro_batch`, to the step's sum. Every
    micro-batch of a step therefore sees the centre of the step's start, and :meth:`end_step` makes the step's one
    update

    .. math:: c \leftarrow m\,c + (1 - m)\,\bar c, \qquad m = \rho^\kappa

    with :math:`\bar c` the sample-weighted mean of the step's micro-batch centres: one forward over the whole
    step's batch at momentum :math:`\rho^\kappa`, whatever the accumulation and however uneven the micro-batches.
    The object's own momentum attribute is not read while attached (``base_momentum`` is used); it is set to 0
    only for the duration of each intercepted call, and put back even if that call raises. A method called
    several times in one micro-batch adds each call's centre with the micro-batch's weight. While the object is in
    eval mode (``training`` False: Lightning's validation and its sanity check), the method runs as lightly's own,
    outside the step, as it would without this class.

    The sum pending within a step is not checkpointed: Lightning's checkpoints fall between optimizer steps, where
    it is empty (one taken mid-step, by a validation inside an accumulation window, resumes without it), and
    :meth:`attach` and :meth:`restore` drop it (a step interrupted before it ended does not count).

    Example:
        >>> class Centred(torch.nn.Module):  # the shape of lightly's Center
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_buffer("center", torch.zeros(1, 2))
        ...         self.momentum = 0.9
        ...     def update(self, x):
        ...         self.center = self.center * self.momentum + x.mean(0, keepdim=True) * (1 - self.momentum)
        >>> module = torch.nn.Module()
        >>> module.criterion = Centred()
        >>> update = CenterUpdate.resolve(module, "criterion", base_momentum=0.9)
        >>> update.attach()
        >>> for samples, value in [(6, 1.0), (2, 5.0)]:  # one step of two micro-batches, base batch 4
        ...     update.micro_batch(samples)
        ...     module.criterion.update(torch.full((samples, 2), value))
        >>> module.criterion.center  # every micro-batch saw the step's starting centre
        tensor([[0., 0.]])
        >>> update.end_step(kappa=8 / 4)  # mean (6 * 1 + 2 * 5) / 8 = 2, at m = 0.9 ** 2 = 0.81
        >>> module.criterion.center
        tensor([[0.3800, 0.3800]])
        >>> update.restore()
        >>> "update" in vars(module.criterion)
        False
    """

    path: str
    owner: Any
    method: str
    momentum: str
    base_momentum: float
    #: The instance attribute the method shadowed when attached (``_MISSING``: the class's method), put back by
    #: :meth:`restore`; ``None`` while detached.
    _shadowed: Any = field(default=None, repr=False)
    _sum: Optional[torch.Tensor] = field(default=None, repr=False)
    _weight: int = field(default=0, repr=False)
    _samples: Optional[int] = field(default=None, repr=False)
    _last_momentum: float = field(default=math.nan, repr=False)

    @classmethod
    def resolve(cls, module: Any, path: str, base_momentum: float) -> CenterUpdate:
        """Find the centre-keeping object at the dotted ``path`` of ``module`` (``""``: ``module`` itself).

        Raises:
            ValueError: ``path`` does not exist; the object there is none of lightly's ``DINOLoss`` (method
                ``update_center``, floating-point tensor ``center``, number ``center_momentum``) or ``Center``
                (``update``, ``center``, ``momentum``), by duck typing; ``base_momentum`` is outside [0, 1).
            TypeError: ``base_momentum`` is not a real number.
        """
        base = check_momentum(base_momentum, f"center_momenta[{path!r}]")
        found: Any = module
        for part in path.split(".") if path else ():
            parent, found = found, getattr(found, part, _MISSING)
            if found is _MISSING:
                raise ValueError(
                    f"`center_momenta` names {path!r}, which {type(module).__name__} does not have"
                    f" ({type(parent).__name__} has no attribute {part!r})"
                )
        problems = {kind: _problems(found, kind) for kind in _KINDS}
        kind = min(_KINDS, key=lambda k: len(problems[k]))  # the first of the closest shapes
        if problems[kind]:
            raise ValueError(
                f"`center_momenta` names {path!r}, a {type(found).__name__} with {', '.join(problems[kind])}: a DINO"
                f" centre needs {_needs()}"
            )
        return cls(path, found, kind.method, kind.momentum, base)

    # ------------------------------------------------------------------------------------------ wiring
    @property
    def attached(self) -> bool:
        """Whether the update method is intercepted."""
        return self._shadowed is not None

    def attach(self) -> None:
        """Intercept the object's update method (on the instance); nothing pending. Attached already: nothing.

        Raises:
            ValueError: another :class:`CenterUpdate` intercepts the same object's method (two paths to one loss).
        """
        if self.attached:
            return
        shadowed = vars(self.owner).get(self.method, _MISSING)
        if isinstance(shadowed, _Intercept):
            raise ValueError(
                f"`center_momenta` names {self.path!r}, the same {type(self.owner).__name__} as"
                f" {shadowed.update.path!r}, whose `{self.method}` is intercepted already: name each centre once"
            )
        self._clear()
        self._shadowed = shadowed
        setattr(self.owner, self.method, _Intercept(self))

    def restore(self) -> None:
        """Put the original update method back (the class's, or what the instance held before) and drop what is
        pending. The momentum attribute is as it was: it is only changed inside an intercepted call. Detached
        already: nothing."""
        if not self.attached:
            return
        if self._shadowed is _MISSING:
            delattr(self.owner, self.method)
        else:
            setattr(self.owner, self.method, self._shadowed)
        self._shadowed = None
        self._clear()

    # ------------------------------------------------------------------------------------------ the step
    def micro_batch(self, samples: int) -> None:
        """Announce the next micro-batch's global size (all data-parallel ranks), before its forward: each centre
        the forward computes counts with this weight, until the next call or :meth:`end_step`. The same count on
        every rank, so that every rank makes the same update.

        Raises:
            ValueError: ``samples`` is not a positive integer.
        """
        self._samples = check_positive_int(samples, "samples", what=" (the micro-batch's global size)")

    @property
    def pending_samples(self) -> int:
        """The weight summed into the step under way (samples over the intercepted calls)."""
        return self._weight

    @property
    def last_momentum(self) -> float:
        """The momentum :math:`\\rho^\\kappa` of the last update (``nan`` before the first)."""
        return self._last_momentum

    @torch.no_grad()
    def end_step(self, kappa: float) -> None:
        """Move the centre once for the step: ``center <- m center + (1 - m) mean`` with ``m = base_momentum **
        kappa`` and ``mean`` the sample-weighted mean of the step's micro-batch centres; ``kappa`` is the step's
        global samples over the base batch. A step without an intercepted call leaves the centre alone. Clears what
        is pending and the announced micro-batch.

        Raises:
            ValueError: ``kappa`` is not a positive finite number (nothing pending is lost).
            TypeError: ``kappa`` is not a real number.
        """
        momentum = scale_ema_momentum(self.base_momentum, kappa)
        total, weight = self._sum, self._weight
        self._clear()
        if total is None:
            return
        center = getattr(self.owner, _CENTER)
        mean = (total / weight).to(center.dtype)
        center.copy_(center * momentum + mean * (1 - momentum))  # lightly's formula, written in place
        self._last_momentum = momentum

    def _clear(self) -> None:
        self._sum, self._weight, self._samples = None, 0, None

    def _original(self) -> Any:
        """The update method as the object has it when detached, bound to it."""
        owner = self.owner
        if self._shadowed is _MISSING:
            return getattr(type(owner), self.method).__get__(owner, type(owner))
        return self._shadowed

    @torch.no_grad()
    def _intercepted(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner
        if getattr(owner, "training", True) is False:  # evaluation (Lightning's validation, its sanity check)
            return self._original()(*args, **kwargs)
        samples = self._samples
        if samples is None:
            raise RuntimeError(
                f"{type(owner).__name__}.{self.method} of {self.path!r} ran in training mode with no micro-batch"
                " announced: call `micro_batch(samples)` (`ScaledEMA.count_samples` does) before each training"
                " forward, not after it"
            )
        original = self._original()
        center = getattr(owner, _CENTER)
        data = center.data  # DINOLoss writes `self.center.data`, Center rebinds `self.center`: undo either
        momentum = getattr(owner, self.momentum)
        setattr(owner, self.momentum, torch.zeros_like(momentum) if isinstance(momentum, torch.Tensor) else 0.0)
        try:
            original(*args, **kwargs)
            batch_center = getattr(owner, _CENTER).detach()  # center * 0 + batch_center * 1: lightly's own
        finally:
            setattr(owner, self.momentum, momentum)
            center.data = data
            if getattr(owner, _CENTER) is not center:
                setattr(owner, _CENTER, center)
        if batch_center.shape != center.shape:
            raise ValueError(
                f"{type(owner).__name__}.{self.method} of {self.path!r} computed a micro-batch centre of shape"
                f" {tuple(batch_center.shape)} for a centre of shape {tuple(center.shape)}: give it outputs whose"
                " centre has the centre's shape"
            )
        dtype = torch.promote_types(center.dtype, torch.float32)  # summed in float32 at least (a bf16 centre)
        weighted = batch_center.to(dtype) * samples
        self._sum = weighted if self._sum is None else self._sum + weighted
        self._weight += samples
        return None
