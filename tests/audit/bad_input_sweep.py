"""A reproducible bad-input and fault sweep of lightning_emascale's public API (issue 23).

Run::

    python tests/audit/bad_input_sweep.py [--json out.json] [--only TEXT] [--list] [--width N]

Nothing runs at import (pytest collects this folder with ``--doctest-modules``): torch, Lightning and the package
are imported by :func:`main`. Every case is a small function registered with an ``area``, a ``name``, what it
expects and the tokens the message must contain:

- ``expect="raise"``: an exception; a warning instead does not count.
- ``expect="warn"``: a warning (or an exception), e.g. a run that ends before its schedule does.

A token is a string the message must contain, or a tuple of alternatives (one of them must be there): usually the
argument's (or key's, or file's) name and the bad value as ``repr`` or ``str``. Each case runs alone, with fresh
objects, warnings recorded, and a fingerprint of what it ``watch``-es taken right before the faulty call and
compared after it: a module's tensors (values, dtype, shape, ``requires_grad``, ``data_ptr``, storage, identity),
an optimizer's param groups, state and hooks, a ``ScaledEMA``'s or a callback's counters, ``state_dict()`` and EMA
tensors, and every file under a watched directory. Outcomes:

- ``clear``: raised (or, where a warning is expected, warned) with every token, from a deliberate ``raise`` in
  lightning_emascale, and nothing watched changed;
- ``unclear``: raised, but the message lacks a token, or the exception is a raw one (raised outside the package,
  by torch, Lightning or Python itself: an ``AttributeError``, an ``OverflowError`` of ``float()``, a bare
  ``NotImplementedError``, torch's "str is not an Optimizer"...);
- ``silent``: no exception (and, where a warning is accepted, no warning with the tokens... or no warning at all),
  or a wrong result;
- ``state-changed``: raised, but something watched had changed by then (the error came too late);
- ``ok``: no exception, and the case checked that the input was handled correctly (only where the case allows it,
  e.g. a resume that restores the training weights instead of refusing);
- ``harness-error``: the case itself failed (a bug of this script; should be 0).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import linecache
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Filled in by _load() (nothing heavy at import time).
torch: Any = None
L: Any = None
lem: Any = None
PACKAGE_DIR = ""

HUGE = 10**400  # an int no float can hold
NAN = float("nan")
INF = float("inf")
DROP = object()  # a keyword argument to leave out of a case's base arguments
CLASSES = ("clear", "unclear", "silent", "state-changed", "ok", "harness-error")
NOISE = (  # warnings that say nothing about the input under test
    "does not have many workers",
    "GPU available",
    "`flat_parameters=True` is deprecated",
    "is smaller than the logging interval",
    "You defined a `validation_step` but have no `val_dataloader`",
    "The `srun` command is available",
    "Checkpoint directory",
    "`training_step` returned `None`",
    "LeafSpec",
    "`isinstance(treespec, LeafSpec)`",
    "torch.cuda",
    "Detected call of `lr_scheduler.step()` before `optimizer.step()`",
    "The epoch parameter in `scheduler.step()`",
)


# ------------------------------------------------------------------------------------------------- registry
@dataclass
class Case:
    area: str
    name: str
    fn: Callable[[Probe], Any]
    expect: str = "raise"
    tokens: tuple[Any, ...] = ()


CASES: list[Case] = []


def add(area: str, name: str, fn: Callable[[Probe], Any], expect: str = "raise", tokens: Any = ()) -> None:
    assert expect in ("raise", "warn"), expect
    CASES.append(Case(area, name, fn, expect, tuple(tokens)))


def V(value: Any) -> tuple[str, ...]:
    """The ways a message may show ``value`` (its repr or its str)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**20:
        digits = len(str(abs(value)))
        return (str(value)[:15], "10**", f"e+{digits - 1}", f"{digits} digits")
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if isinstance(value, float) and math.isinf(value):
        return ("inf",)
    if isinstance(value, str) and not value.strip():
        return (repr(value),)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return (repr(value), f"got {int(value)}")
    return tuple(dict.fromkeys((repr(value), str(value))))


def _n(value: Any) -> str:
    """``value`` for a case name: powers of ten as such, long reprs cut."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 10**20:
        return f"10**{len(str(value)) - 1}"
    text = repr(value)
    return text if len(text) <= 30 else text[:30] + "..."


def has_tokens(message: str, tokens: tuple[Any, ...]) -> bool:
    return all(
        any(option in message for option in (token if isinstance(token, tuple) else (token,))) for token in tokens
    )


# ---------------------------------------------------------------------------------------------- fingerprints
def digest(obj: Any) -> str:
    """A hash of nested dicts, lists, tensors and scalars (tensors by dtype, shape and bytes)."""
    h = hashlib.blake2b(digest_size=12)

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            h.update(b"{")
            for key in sorted(value, key=repr):
                h.update(repr(key).encode())
                feed(value[key])
            h.update(b"}")
        elif isinstance(value, (list, tuple)):
            h.update(b"[")
            for item in value:
                feed(item)
            h.update(b"]")
        else:
            h.update(repr(value).encode())

    feed(obj)
    return h.hexdigest()


def module_print(module: Any) -> dict[str, Any]:
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    out = {}
    for name, t in named:
        out[name] = {
            "values": digest(t),
            "dtype": str(t.dtype),
            "requires_grad": bool(t.requires_grad),
            "data_ptr": t.data_ptr(),
            "storage": t.untyped_storage().data_ptr(),
            "object": id(t),
        }
    return out


def optimizer_print(optimizer: Any) -> dict[str, Any]:
    index = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    return {
        "param_groups": [
            {"params": [id(p) for p in g["params"]], **{k: repr(v) for k, v in g.items() if k != "params"}}
            for g in optimizer.param_groups
        ],
        "state": digest({index.get(id(p), -1): s for p, s in optimizer.state.items()}),
        "hooks": (len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)),
    }


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as error:  # a read that raises is part of the fingerprint
        return f"<{type(error).__name__}>"


def ema_print(ema: Any) -> dict[str, Any]:
    return {
        "samples_seen": ema.samples_seen,
        "optimizer_steps": ema.optimizer_steps,
        "ema_updates": ema.ema_updates,
        "samples_pending": ema.samples_pending,
        "base": ema.resolved_base_batch_size,
        "is_swapped": ema.is_swapped,
        "attributes": repr(ema.momentum_attribute_values()),
        "state_dict": _try(lambda: digest(ema.state_dict())),
    }


def callback_print(callback: Any) -> dict[str, Any]:
    """A callback's counters and ``state_dict()``; an EMA callback's ScaledEMA once it exists (before fit, its
    ``state_dict()`` is the state stashed for fit start, and the ScaledEMA is ``None``: its appearing when fit starts
    is no change)."""
    ema = getattr(callback, "_ema", None)
    out: dict[str, Any] = {"counters": counters_print(callback)}
    if hasattr(callback, "_ema"):
        out["stashed state"] = _try(lambda: digest(callback.state_dict())) if ema is None else None
        out["scaled_ema"] = ema_print(ema) if ema is not None else None
    else:
        out["state_dict"] = _try(lambda: digest(callback.state_dict()))
    return out


def counters_print(callback: Any) -> dict[str, Any]:
    return {
        name: _try(lambda name=name: getattr(callback, name))
        for name in ("samples_seen", "optimizer_steps", "ema_updates")
        if hasattr(type(callback), name)
    }


class CountersOf:
    """Watch only an object's counters (a callback in a fit: its other state is the fit's own business)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj


def dir_print(path: Path) -> Any:
    if not path.exists():
        return "<absent>"
    if path.is_file():
        return {"<file>": hashlib.blake2b(path.read_bytes(), digest_size=12).hexdigest()}
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = Path(root) / name
            files[str(full.relative_to(path))] = hashlib.blake2b(full.read_bytes(), digest_size=12).hexdigest()
    return files


def fingerprint(obj: Any) -> Any:
    if isinstance(obj, CountersOf):
        return counters_print(obj.obj)
    if isinstance(obj, (list, tuple)):
        return [fingerprint(item) for item in obj]
    if isinstance(obj, torch.nn.Module):
        return module_print(obj)
    if isinstance(obj, torch.optim.Optimizer):
        return optimizer_print(obj)
    if isinstance(obj, lem.ScaledEMA):
        return ema_print(obj)
    if isinstance(obj, (str, Path)):
        return dir_print(Path(obj))
    if callable(getattr(obj, "state_dict", None)):
        return callback_print(obj)
    raise TypeError(f"cannot fingerprint {type(obj).__name__}")


def differences(before: Any, after: Any, where: str) -> list[str]:
    if before == after or before is None or after is None:  # None: the object does not exist (yet, or any more)
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            if key not in before:
                out.append(f"{where}.{key} appeared")
            elif key not in after:
                out.append(f"{where}.{key} vanished")
            else:
                out.extend(differences(before[key], after[key], f"{where}.{key}"))
        return out
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [d for i, (b, a) in enumerate(zip(before, after)) for d in differences(b, a, f"{where}[{i}]")]
    return [where]


class Probe:
    """What a case watches, its scratch directory, and what it found."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.objects: dict[str, Any] = {}
        self.before: dict[str, Any] = {}
        self.handled_note: str | None = None
        self.wrong_note: str | None = None

    def watch(self, **objects: Any) -> None:
        """Fingerprint these objects now (replacing what was watched): the call that follows must leave them as
        they are if it raises."""
        before = {name: fingerprint(obj) for name, obj in objects.items()}
        self.objects, self.before = objects, before

    def changes(self) -> list[str]:
        out = []
        for name, obj in self.objects.items():
            try:
                now = fingerprint(obj)
            except Exception as error:
                out.append(f"{name} unreadable ({type(error).__name__})")
                continue
            out.extend(differences(self.before[name], now, name))
        return out

    def handled(self, note: str) -> None:
        """The input was accepted and handled correctly (the case checked it)."""
        self.handled_note = note

    def wrong(self, note: str) -> None:
        """The input was accepted and the result is wrong."""
        self.wrong_note = note


# ------------------------------------------------------------------------------------------------ the runner
@dataclass
class Result:
    area: str
    name: str
    cls: str
    expect: str
    tokens: list[Any]
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _is_raw(error: BaseException) -> tuple[bool, str]:
    """Whether ``error`` was raised by torch, Lightning or Python rather than by a ``raise`` in the package; and
    where it was raised."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return True, "?"
    last = frames[-1]
    where = f"{os.path.relpath(last.filename, os.path.dirname(PACKAGE_DIR))}:{last.lineno}"
    if not os.path.abspath(last.filename).startswith(PACKAGE_DIR):
        return True, where
    line = linecache.getline(last.filename, last.lineno).strip()
    return not line.startswith("raise"), where


def _in_harness(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename) == os.path.abspath(__file__)


def run_case(case: Case, root: Path) -> Result:
    tmp = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    probe = Probe(tmp)
    error: BaseException | None = None
    returned: Any = None
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=r"`flat_parameters=True` is deprecated", category=FutureWarning)
        try:
            returned = case.fn(probe)
        except Exception as caught:
            error = caught
    seconds = time.perf_counter() - start
    changes = probe.changes() if error is not None else []
    said = [f"{w.category.__name__}: {w.message}" for w in record]
    relevant = [text for text in said if not any(noise in text for noise in NOISE)]
    result = Result(case.area, case.name, "", case.expect, list(case.tokens), warnings=relevant, seconds=seconds)
    if error is not None:
        raw, where = _is_raw(error)
        result.message = f"{type(error).__name__}: {error}".replace("\n", " ")
        result.changes = changes
        if _in_harness(error):
            result.cls = "harness-error"
            result.message += " | " + "".join(traceback.format_exception(error)[-3:]).replace("\n", " ")
        elif changes:
            result.cls = "state-changed"
        elif raw or not has_tokens(str(error), case.tokens):
            result.cls = "unclear"
            if raw:
                result.message += f" [raw, raised at {where}]"
        else:
            result.cls = "clear"
    elif probe.handled_note is not None and probe.wrong_note is None:
        result.cls = "ok"
        result.message = f"handled: {probe.handled_note}"
    elif case.expect == "warn" and relevant and probe.wrong_note is None:
        result.cls = "clear" if any(has_tokens(text, case.tokens) for text in relevant) else "unclear"
        result.message = " | ".join(relevant)
    else:
        result.cls = "silent"
        parts = []
        if probe.wrong_note:
            parts.append(f"wrong: {probe.wrong_note}")
        if returned is not None:
            parts.append(f"returned {_short(returned)}")
        parts.append("no exception" + (f"; warned: {' | '.join(relevant)}" if relevant else ", no warning"))
        result.message = "; ".join(parts)
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# =========================================================================================== shared builders
Net: Any = None
TeacherNet: Any = None
Boring: Any = None
TeacherBoring: Any = None
GreedyBoring: Any = None
StartRecorder: Any = None
CustomRule: Any = None


def _load() -> None:
    """Import torch, Lightning and the package, and define the small models the cases use."""
    global torch, L, lem, PACKAGE_DIR, Net, TeacherNet, Boring, TeacherBoring, GreedyBoring, StartRecorder, CustomRule
    import lightning
    import torch as _torch

    import lightning_emascale

    torch, L, lem = _torch, lightning, lightning_emascale
    PACKAGE_DIR = os.path.dirname(os.path.abspath(lightning_emascale.__file__))
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    class _Net(torch.nn.Module):
        """Linear -> BatchNorm -> Linear, with momentum-like attributes of several kinds."""

        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
            self.center_momentum = 0.9
            self.label = "abc"
            self.register_buffer("int_momentum", torch.tensor(1))

        @property
        def ro_momentum(self) -> float:  # read only
            return 0.9

        def forward(self, x: Any) -> Any:
            return self.body(x)

    class _TeacherNet(torch.nn.Module):
        def __init__(self, frozen: bool = True) -> None:
            super().__init__()
            self.backbone = torch.nn.Linear(4, 4)
            self.backbone_momentum = copy.deepcopy(self.backbone).requires_grad_(not frozen)
            self.head = torch.nn.Linear(4, 1)
            self.wrong = torch.nn.Linear(4, 3).requires_grad_(False)
            self.center_momentum = 0.9

        def forward(self, x: Any) -> Any:
            return self.head(self.backbone(x)) + 0.0 * self.backbone_momentum(x).sum()

    class _Boring(L.LightningModule):
        def __init__(self, n: int = 32, batch_size: int = 4, optimizer: str = "sgd") -> None:
            super().__init__()
            self.batch_size = batch_size
            self.optimizer_name = optimizer
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
            generator = torch.Generator().manual_seed(0)
            self.x = torch.randn(n, 4, generator=generator)
            self.y = torch.randn(n, 1, generator=generator)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def train_dataloader(self) -> Any:
            dataset = torch.utils.data.TensorDataset(self.x, self.y)
            return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size)

        def configure_optimizers(self) -> Any:
            params = [p for p in self.parameters() if p.requires_grad]
            if self.optimizer_name == "adam":
                return torch.optim.Adam(params, lr=1e-3)
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)

    class _TeacherBoring(_Boring):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Linear(4, 4)
            self.backbone_momentum = copy.deepcopy(self.backbone)  # trainable: freeze_teachers freezes it

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(self.backbone(x)), y) + 0.0 * self.backbone_momentum(x).sum()

    class _GreedyBatches(torch.utils.data.Sampler):
        """A batch sampler that yields twice the samples its ``sampler`` holds."""

        def __init__(self, n: int) -> None:
            self.sampler = torch.utils.data.SequentialSampler(range(n))
            self.n = n

        def __iter__(self) -> Any:
            for start in range(0, 2 * self.n, 4):
                yield [index % self.n for index in range(start, start + 4)]

        def __len__(self) -> int:
            return 2 * self.n // 4

    class _GreedyBoring(_Boring):
        def train_dataloader(self) -> Any:
            dataset = torch.utils.data.TensorDataset(self.x, self.y)
            return torch.utils.data.DataLoader(dataset, batch_sampler=_GreedyBatches(len(dataset)))

    class _StartRecorder(L.Callback):
        """Records the module's state_dict when training starts (after any checkpoint was restored)."""

        weights: dict[str, Any] | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    class _CustomRule(lem.OptimizerRule):
        """A user's rule whose ``scale`` returns ``values`` (or calls it with the group when callable)."""

        def __init__(self, values: Any) -> None:
            self.values = values

        def scale(self, group: Any, kappa: float) -> Any:
            return self.values(group) if callable(self.values) else copy.copy(self.values)

        def __repr__(self) -> str:
            return f"CustomRule({self.values!r})"

    Net, TeacherNet, Boring, TeacherBoring = _Net, _TeacherNet, _Boring, _TeacherBoring
    GreedyBoring, StartRecorder, CustomRule = _GreedyBoring, _StartRecorder, _CustomRule


def _net() -> Any:
    torch.manual_seed(0)
    return Net()


def _sgd(module: Any) -> Any:
    return torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def _adam(module: Any) -> Any:
    return torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3)


def _train(p: Probe, model: Any, optimizer: Any, ema: Any, steps: int = 2, batch: int = 8) -> None:
    """``steps`` optimizer steps of ``batch`` samples, each call watched on its own (only the call that raises
    is judged by what it changed)."""
    for _ in range(steps):
        x = torch.randn(batch, 4)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        p.watch(module=model, optimizer=optimizer, ema=ema)
        ema.count_samples(batch)
        p.watch(module=model, optimizer=optimizer, ema=ema)
        optimizer.step()


def _trainer(callbacks: list[Any], **kwargs: Any) -> Any:
    """The tests' Trainer (``tests/helpers.py``), stopped after 4 optimizer steps unless a case says otherwise."""
    tests = str(Path(__file__).resolve().parents[1])
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from helpers import make_trainer

    return make_trainer(callbacks, **{"max_steps": 4, "max_epochs": None, **kwargs})


def _floats_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = [k for k in b if k in a and b[k].is_floating_point()]
    return bool(keys) and all(torch.equal(a[k].float(), b[k].float()) for k in keys)


_CACHE: dict[str, Any] = {}
ROOT: Path = Path(".")
EMA_KEY = "EMAScalingCallback{'name': 'ema'}"


def _base_checkpoint() -> Path:
    """A checkpoint of a 4-step fit with ``EMAScalingCallback(momentum=0.9, base_batch_size=4)`` (made once)."""
    if "ckpt" not in _CACHE:
        torch.manual_seed(0)
        callback = lem.EMAScalingCallback(momentum=0.9, base_batch_size=4)
        trainer = _trainer([callback], max_steps=4)
        trainer.fit(Boring())
        path = ROOT / "base.ckpt"
        trainer.save_checkpoint(path)
        _CACHE["ckpt"] = path
    return _CACHE["ckpt"]


def _checkpoint() -> dict[str, Any]:
    return torch.load(_base_checkpoint(), map_location="cpu", weights_only=False)


def _fitted(**callback_kwargs: Any) -> tuple[Any, Any]:
    """A fresh module and EMAScalingCallback after a 2-step fit."""
    torch.manual_seed(0)
    callback = lem.EMAScalingCallback(**{"momentum": 0.9, "base_batch_size": 4, **callback_kwargs})
    model = Boring()
    _trainer([callback], max_steps=2).fit(model)
    return model, callback


def _make_run(name: str, seed: int, sigma_rels: tuple[float, ...], every: int, steps: int, arch: str = "net") -> Path:
    """The snapshots of a post-hoc run in a plain loop (batch 8, a final snapshot), made once per name."""
    folder = ROOT / "runs" / name
    if not folder.exists():
        torch.manual_seed(seed)
        model = Net() if arch == "net" else torch.nn.Sequential(torch.nn.Linear(4, 2))
        optimizer = _sgd(model)
        ema = lem.ScaledEMA(model, optimizer, sigma_rels=sigma_rels, snapshot_every_samples=every,
                            snapshot_dir=folder, base_batch_size=8)  # fmt: skip
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            ema.count_samples(8)
            optimizer.step()
        ema.save_snapshot()
    return folder


def _run_a() -> Path:  # 16, 32, 48
    return _make_run("a", 0, (0.05, 0.1), every=16, steps=6)


def _copy_run(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        shutil.copy(file, target / file.name)
    return target


def _snap_name(samples: int) -> str:
    return f"post_hoc-{samples:015d}.pt"


# ================================================================================================ the cases
def _merge(base: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **kwargs}
    return {k: v for k, v in merged.items() if v is not DROP}


POLYAK = {"momentum": 0.9, "base_batch_size": 8, "optimizer_rule": "sgd"}
TEACHER = {"momentum": 0.9, "base_batch_size": 8, "teachers": {"backbone": "backbone_momentum"}}


def _post_hoc_base(p: Probe) -> dict[str, Any]:
    return {"sigma_rels": (0.05, 0.1), "snapshot_every_samples": 16, "snapshot_dir": p.tmp / "snaps",
            "base_batch_size": 8}  # fmt: skip


def ema_case(
    name: str,
    kwargs: Any,
    tokens: Any,
    *,
    mode: str = "polyak",
    steps: int = 3,
    optimizer: Any = _sgd,
    module: Any = None,
    expect: str = "raise",
    area: str = "ScaledEMA.__init__",
) -> None:
    """Build a ScaledEMA with bad arguments (``kwargs`` may be a function of the probe), then train ``steps``
    steps: an argument accepted when built and failing later fails in a watched step."""

    def fn(p: Probe) -> None:
        model = (module or (TeacherNet if mode == "teacher" else _net))()
        opt = optimizer(model) if optimizer is not None else None
        base = {"polyak": POLYAK, "teacher": TEACHER}.get(mode) or _post_hoc_base(p)
        args = _merge(base, kwargs(p) if callable(kwargs) and not isinstance(kwargs, dict) else kwargs)
        watched = {"module": model} if isinstance(model, torch.nn.Module) else {}
        if opt is not None:
            watched["optimizer"] = opt
        p.watch(**watched)
        ema = lem.ScaledEMA(model, opt, **args)
        if opt is not None:
            _train(p, model, opt, ema, steps)

    add(area, name, fn, expect, tokens)


def _reg_scaled_ema_init() -> None:
    area = "ScaledEMA.__init__"
    for value in ("0.9", -0.1, 1.0, 1.5, NAN, INF, -INF, True, [0.9], HUGE, 1j):
        ema_case(f"momentum={_n(value)}", {"momentum": value}, ["momentum", V(value)])
    for value in (0, -8, 8.5, "8", True, NAN, INF, HUGE, [8]):
        ema_case(f"base_batch_size={_n(value)}", {"base_batch_size": value}, ["base_batch_size", V(value)])
    for value in ("lars", 1, True, [], "sgd "):
        ema_case(f"optimizer_rule={value!r}", {"optimizer_rule": value}, ["optimizer_rule", V(value)])
    ema_case("optimizer_rule=OptimizerRule()", lambda p: {"optimizer_rule": lem.OptimizerRule()},
             ["optimizer_rule", "OptimizerRule()"])  # fmt: skip
    ema_case("optimizer_rule=SGDScalingRule (the class)", lambda p: {"optimizer_rule": lem.SGDScalingRule},
             ["optimizer_rule", "SGDScalingRule"])  # fmt: skip
    ema_case("optimizer_rule='adam' with SGD", {"optimizer_rule": "adam"}, ["optimizer_rule", "SGD"])
    ema_case("optimizer_rule='sgd' with Adam", {}, ["optimizer_rule", "Adam"], optimizer=_adam)
    for value in (0, -1, 1.5, "2", True, None, NAN):
        ema_case(f"update_every={value!r}", {"update_every": value}, ["update_every", V(value)])
    ema_case("update_every=10**400", {"update_every": HUGE}, ["update_every"], expect="warn")
    for value in (1, "True", None):
        ema_case(f"warmup={value!r}", {"warmup": value}, ["warmup", V(value)])
    for value in ("fp16", None, 32, "FP32"):
        ema_case(f"ema_precision={value!r}", {"ema_precision": value}, ["ema_precision", V(value)])
    for value in ("linear", None, 5, ""):
        ema_case(f"momentum_schedule={value!r}", {"momentum_schedule": value}, ["momentum_schedule", V(value)])
    schedules = {
        "returns nan": (lambda progress: NAN, "nan"),
        "returns 1.5": (lambda progress: 1.5, "1.5"),
        "returns '0.9'": (lambda progress: "0.9", "'0.9'"),
        "returns None": (lambda progress: None, "None"),
        "takes no argument": (lambda: 0.9, "progress"),
        "returns -0.5 at 1": (lambda progress: 0.9 if progress < 1 else -0.5, "-0.5"),
    }
    for label, (schedule, shown) in schedules.items():
        ema_case(f"momentum_schedule callable {label}", {"momentum_schedule": schedule, "momentum": DROP,
                 "total_samples": 64}, ["momentum_schedule", shown])  # fmt: skip
    ema_case("momentum_schedule callable with momentum", {"momentum_schedule": lambda p: 0.9, "total_samples": 64},
             ["momentum", "0.9"])  # fmt: skip
    ema_case("momentum_schedule='cosine' without final_momentum", {"momentum_schedule": "cosine"},
             ["final_momentum"])  # fmt: skip
    ema_case("final_momentum with 'constant'", {"final_momentum": 0.99}, ["final_momentum", "0.99"])
    for value in (1.5, NAN, "1", -0.1, HUGE, INF):
        ema_case(f"final_momentum={_n(value)}", {"momentum_schedule": "cosine", "final_momentum": value,
                 "total_samples": 64}, ["final_momentum", V(value)])  # fmt: skip
    cosine = {"momentum_schedule": "cosine", "final_momentum": 1.0}
    for value in (0, -1, 1.5, "100", True, NAN, [64]):
        ema_case(f"total_samples={value!r}", {**cosine, "total_samples": value}, ["total_samples", V(value)])
    ema_case("total_samples=10**400", {**cosine, "total_samples": HUGE}, ["total_samples"], expect="warn")
    # teachers
    for value, shown in (({}, "{}"), ("backbone", "'backbone'"), (["backbone"], "['backbone']"),
                         ({"backbone": 1}, "1"), ({1: "backbone_momentum"}, "1"), ({"backbone": ""}, "''")):  # fmt: skip
        ema_case(f"teachers={value!r}", {"teachers": value}, ["teachers", shown], mode="teacher")
    ema_case("teachers: online path missing", {"teachers": {"nope": "backbone_momentum"}}, ["teachers", "'nope'"],
             mode="teacher")  # fmt: skip
    ema_case("teachers: teacher path missing", {"teachers": {"backbone": "nope"}}, ["teachers", "'nope'"],
             mode="teacher")  # fmt: skip
    ema_case("teachers: maps to itself", {"teachers": {"backbone": "backbone"}}, ["teachers", "'backbone'"],
             mode="teacher")  # fmt: skip
    ema_case("teachers: shapes differ", {"teachers": {"backbone": "wrong"}}, ["'wrong'", "shape"], mode="teacher")
    ema_case("teachers: teacher trainable", {}, ["backbone_momentum", "requires grad"], mode="teacher",
             module=lambda: TeacherNet(frozen=False))  # fmt: skip
    ema_case("teachers: two onlines, one teacher", {"teachers": {"backbone": "backbone_momentum",
             "head": "backbone_momentum"}}, ["backbone_momentum"], mode="teacher")  # fmt: skip
    ema_case("teachers + ema_precision='model'", {"ema_precision": "model"}, ["ema_precision"], mode="teacher")
    # momentum_attributes
    for value, shown in (({}, "{}"), (["center_momentum"], "['center_momentum']"), ({5: 0.9}, "5"),
                         ({"center_momentum": 1.5}, "1.5"), ({"center_momentum": "0.9"}, "'0.9'"),
                         ({"center_momentum": NAN}, "nan"), ({"center_momentum": True}, "True"),
                         ({"center_momentum": HUGE}, V(HUGE))):  # fmt: skip
        ema_case(f"momentum_attributes={_n(value)}", {"momentum_attributes": value}, ["momentum_attributes", shown])
    ema_case("momentum_attributes: path missing", {"momentum_attributes": {"nope.center": 0.9}},
             ["momentum_attributes", "'nope.center'"])  # fmt: skip
    ema_case("momentum_attributes: holds a str", {"momentum_attributes": {"label": 0.9}},
             ["momentum_attributes", "'label'", "'abc'"])  # fmt: skip
    ema_case("momentum_attributes: read-only property", {"momentum_attributes": {"ro_momentum": 0.9}},
             ["momentum_attributes", "ro_momentum"])  # fmt: skip
    ema_case("momentum_attributes: an integer tensor", {"momentum_attributes": {"int_momentum": 0.9}},
             ["momentum_attributes", "int_momentum"])  # fmt: skip
    ema_case("momentum_attributes without base_batch_size", {"momentum_attributes": {"center_momentum": 0.9},
             "base_batch_size": DROP, "optimizer_rule": DROP}, ["momentum_attributes", "base_batch_size"])  # fmt: skip
    # post-hoc: sigma_rels, snapshot_every_samples, snapshot_dir
    for value, shown in (([], "[]"), ("0.1", "'0.1'"), ([0], "0"), ([-0.1], "-0.1"), ([0.5], "0.5"), ([NAN], "nan"),
                         ([0.1, 0.1], "0.1"), ([HUGE], V(HUGE)), ([True], "True"), ([[0.1]], "[0.1]"),
                         ({0.1}, "{0.1}"), (0.1, "0.1")):  # fmt: skip
        ema_case(f"sigma_rels={_n(value)}", {"sigma_rels": value}, ["sigma_rel", shown], mode="post_hoc")
    ema_case("sigma_rels=None with snapshot args", {"sigma_rels": None, "momentum": 0.9}, ["sigma_rels"],
             mode="post_hoc")  # fmt: skip
    ema_case("sigma_rels with momentum", {"momentum": 0.9}, ["momentum", "0.9"], mode="post_hoc")
    for value in (0, -16, 1.5, "16", True, None, NAN):
        ema_case(f"snapshot_every_samples={value!r}", {"snapshot_every_samples": value},
                 ["snapshot_every_samples", V(value)], mode="post_hoc")  # fmt: skip
    ema_case("snapshot_every_samples=10**400", {"snapshot_every_samples": HUGE}, ["snapshot_every_samples"],
             mode="post_hoc", expect="warn")  # fmt: skip
    for value in (None, "", 5, b"snaps"):
        ema_case(f"snapshot_dir={value!r}", {"snapshot_dir": value}, ["snapshot_dir", V(value)], mode="post_hoc")

    def file_dir(p: Probe) -> dict[str, Any]:
        (p.tmp / "file").write_text("x")
        return {"snapshot_dir": p.tmp / "file"}

    def below_file(p: Probe) -> dict[str, Any]:
        (p.tmp / "file").write_text("x")
        return {"snapshot_dir": p.tmp / "file" / "snaps"}

    def nul_dir(p: Probe) -> dict[str, Any]:
        return {"snapshot_dir": str(p.tmp / "sn\x00aps")}

    def other_run(p: Probe) -> dict[str, Any]:
        return {"snapshot_dir": _copy_run(_run_a(), p.tmp / "snaps")}

    ema_case("snapshot_dir is a file", file_dir, ["snapshot_dir", "file"], mode="post_hoc")
    ema_case("snapshot_dir below a file", below_file, ["snapshot_dir", "file"], mode="post_hoc")
    ema_case("snapshot_dir with a NUL byte", nul_dir, ["snapshot_dir", ("\\x00", "NUL", "null")], mode="post_hoc")
    ema_case("snapshot_dir holds another run's snapshots", other_run, ["snapshot_dir", "snaps"], mode="post_hoc")
    ema_case("snapshot_dir without sigma_rels", lambda p: {"snapshot_dir": p.tmp}, ["snapshot_dir", "sigma_rels"])
    # include / exclude
    for option in ("include", "exclude"):
        for value in ("body", [1], ["nope"], ["body", "body"], [""], {"body"}, [None]):
            ema_case(f"{option}={value!r}", {option: value}, [option, V(value[0]) if isinstance(value, list) and
                     value[0] != "body" else V(value)])  # fmt: skip
    ema_case("include=[]", {"include": []}, ["include"])
    ema_case("include and exclude leave nothing", {"include": ["body"], "exclude": ["body"]}, ["include", "exclude"])
    # flags
    for option in ("skip_non_finite", "freeze_teachers", "flat_parameters", "offload", "side_stream", "copy_on_swap"):
        for value in (1, "yes", None):
            ema_case(f"{option}={value!r}", {option: value}, [option, V(value)])
    ema_case("freeze_teachers=True without teachers", {"freeze_teachers": True}, ["freeze_teachers", "teachers"])
    ema_case("offload=True with skip_non_finite", {"offload": True, "skip_non_finite": True}, ["offload"])
    ema_case("copy_on_swap=True in teacher mode", {"copy_on_swap": True}, ["copy_on_swap"], mode="teacher")
    for value in (1, None, "no"):
        ema_case(f"auto_end_step={value!r}", {"auto_end_step": value}, ["auto_end_step", V(value)])
    ema_case("total_samples_from=5", {"total_samples_from": 5, **cosine}, ["total_samples_from", "5"])
    for label, fn, shown in (("0", lambda: 0, "0"), ("'x'", lambda: "x", "'x'"), ("nan", lambda: NAN, "nan"),
                             ("-64", lambda: -64, "-64")):  # fmt: skip
        ema_case(f"total_samples_from returns {label}", {"total_samples_from": fn, **cosine},
                 ["total_samples_from", shown])  # fmt: skip
    # module and optimizers
    for label, factory, shown in (("None", lambda: None, "None"), ("'model'", lambda: "model", "str"),
                                  ("a dict", lambda: {"w": 1}, "dict")):  # fmt: skip
        ema_case(f"module={label}", {}, ["module", shown], module=factory, optimizer=None)
    ema_case("module without tensors (ReLU)", {"optimizer_rule": DROP}, ["module"], module=lambda: torch.nn.ReLU(),
             optimizer=None, expect="warn")  # fmt: skip
    for label, factory, shown in (("'sgd'", lambda m: "sgd", "'sgd'"), ("5", lambda m: 5, "5"),
                                  ("[]", lambda m: [], "optimizer"), ("a dict", lambda m: {"o": _sgd(m)}, "dict"),
                                  ("None with rule 'sgd'", lambda m: None, "optimizer")):  # fmt: skip

        def fn(p: Probe, factory: Any = factory) -> None:
            model = _net()
            p.watch(module=model)
            lem.ScaledEMA(model, factory(model), **POLYAK)

        add(area, f"optimizers={label}", fn, "raise", ["optimizers", shown])

    def same_optimizer_twice(p: Probe) -> None:
        model = _net()
        opt = _sgd(model)
        p.watch(module=model, optimizer=opt)
        lem.ScaledEMA(model, [opt, opt], **POLYAK)

    add(area, "optimizers=[opt, opt]", same_optimizer_twice, "raise", ["optimizers", ("twice", "auto_end_step")])

    def foreign_optimizer(p: Probe) -> None:
        model = _net()
        other = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(other.parameters(), lr=0.1)
        p.watch(module=model, optimizer=opt)
        ema = lem.ScaledEMA(model, opt, **POLYAK)
        for _ in range(2):
            p.watch(module=model, optimizer=opt, ema=ema)
            ema.count_samples(8)
            opt.step()

    # A warning, not an error: an optimizer of master weights written back into the module is legitimate.
    add(area, "optimizer holds none of the module's parameters", foreign_optimizer, "warn",
        [("optimizer",), ("parameters", "module")])  # fmt: skip

    def two_rules(p: Probe) -> None:
        model = _net()
        opt = _sgd(model)
        lem.ScaledEMA(model, opt, **POLYAK)
        p.watch(module=model, optimizer=opt)
        lem.ScaledEMA(model, opt, **POLYAK)

    add(area, "two ScaledEMAs scale one optimizer", two_rules, "raise", ["optimizer_rule", "SGD"])

    # flat_parameters=True and freeze_teachers=True, then a later error: nothing may have moved
    def flat_then(kwargs: dict[str, Any], optimizer: Any) -> Callable[[Probe], None]:
        def fn(p: Probe) -> None:
            model = _net()
            opt = optimizer(model)
            p.watch(module=model, optimizer=opt)
            lem.ScaledEMA(model, opt, **_merge(POLYAK, {"flat_parameters": True, **kwargs}))

        return fn

    add(area, "flat_parameters=True, rule does not fit the optimizer", flat_then({}, _adam), "raise",
        ["optimizer_rule", "Adam"])  # fmt: skip
    add(
        area,
        "flat_parameters=True, bad momentum_attributes path",
        flat_then({"momentum_attributes": {"nope": 0.9}}, _sgd),
        "raise",
        ["momentum_attributes", "'nope'"],
    )
    add(area, "flat_parameters=True, two optimizers with auto_end_step",
        flat_then({}, lambda m: [_sgd(m), _sgd(m)]), "raise", ["auto_end_step"])  # fmt: skip

    def freeze_then(kwargs: dict[str, Any], optimizer: Any) -> Callable[[Probe], None]:
        def fn(p: Probe) -> None:
            model = TeacherNet(frozen=False)
            opt = optimizer(model)
            p.watch(module=model, optimizer=opt)
            lem.ScaledEMA(model, opt, **_merge(TEACHER, {"freeze_teachers": True, **kwargs}))

        return fn

    add(area, "freeze_teachers=True, rule does not fit the optimizer",
        freeze_then({"optimizer_rule": "adam"}, _sgd), "raise", ["optimizer_rule", "SGD"])  # fmt: skip
    add(
        area,
        "freeze_teachers=True, bad momentum_attributes path",
        freeze_then({"momentum_attributes": {"nope": 0.9}}, _sgd),
        "raise",
        ["momentum_attributes", "'nope'"],
    )
    add(area, "freeze_teachers=True, teacher shape mismatch elsewhere",
        freeze_then({"teachers": {"backbone": "backbone_momentum", "head": "wrong"}}, _sgd), "raise",
        ["'wrong'", "shape"])  # fmt: skip


def _reg_scaled_ema_runtime() -> None:
    area = "ScaledEMA.step"

    def built(**kwargs: Any) -> tuple[Any, Any, Any]:
        model = _net()
        opt = _sgd(model)
        return model, opt, lem.ScaledEMA(model, opt, **_merge(POLYAK, kwargs))

    for value in (0, -8, 1.5, "8", True, NAN, None, HUGE, [8]):

        def count(p: Probe, value: Any = value) -> None:
            model, opt, ema = built()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            p.watch(module=model, optimizer=opt, ema=ema)
            ema.count_samples(value)
            p.watch(module=model, optimizer=opt, ema=ema)
            opt.step()

        add(area, f"count_samples({_n(value)})", count, "raise", ["samples", V(value)])

    def step_uncounted(p: Probe) -> None:
        model, opt, ema = built()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        p.watch(module=model, optimizer=opt, ema=ema)
        opt.step()

    add(area, "optimizer.step() without count_samples", step_uncounted, "raise", ["count_samples"])

    def end_uncounted(p: Probe) -> None:
        model, opt, ema = built(auto_end_step=False)
        p.watch(module=model, optimizer=opt, ema=ema)
        ema.end_step()

    add(area, "end_step() without count_samples", end_uncounted, "raise", ["count_samples"])

    def step_swapped(p: Probe) -> None:
        model, opt, ema = built()
        _train(p, model, opt, ema, 1)
        ema.swap_in()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        ema.count_samples(8)
        p.watch(module=model, optimizer=opt, ema=ema)
        opt.step()

    add(area, "optimizer.step() while swapped", step_swapped, "raise", ["swap_out"])

    def swap_twice(p: Probe) -> None:
        model, opt, ema = built()
        _train(p, model, opt, ema, 1)
        ema.swap_in()
        p.watch(module=model, optimizer=opt, ema=ema)
        ema.swap_in()

    add(area, "swap_in() twice", swap_twice, "raise", ["swapped"])

    def reset_swapped(p: Probe) -> None:
        model, opt, ema = built()
        _train(p, model, opt, ema, 1)
        ema.swap_in()
        p.watch(module=model, optimizer=opt, ema=ema)
        ema.reset()

    add(area, "reset() while swapped", reset_swapped, "raise", ["swap_out"])

    def teacher_swap(p: Probe) -> None:
        model = TeacherNet()
        ema = lem.ScaledEMA(model, None, **TEACHER)
        p.watch(module=model, ema=ema)
        ema.swap_in()

    add(area, "swap_in() in teacher mode", teacher_swap, "raise", ["teacher", "backbone_momentum"])
    for value in ("", None, 5, "  "):

        def metrics(p: Probe, value: Any = value) -> None:
            model, opt, ema = built()
            _train(p, model, opt, ema, 1)
            p.watch(module=model, optimizer=opt, ema=ema)
            ema.metrics(prefix=value)

        add(area, f"metrics(prefix={value!r})", metrics, "raise", ["prefix", V(value)])

    def other_module(p: Probe) -> None:
        model, opt, ema = built()
        _train(p, model, opt, ema, 1)
        p.watch(module=model, optimizer=opt, ema=ema)
        ema.functional_call(_net(), (torch.randn(2, 4),))

    add(area, "functional_call(another module)", other_module, "raise", ["module", "Net"])

    def nan_schedule(p: Probe) -> None:
        model = _net()
        opt = _sgd(model)
        schedule = lambda progress: NAN if progress == 0.5 else 0.9  # noqa: E731
        ema = lem.ScaledEMA(model, opt, momentum_schedule=schedule, total_samples=64, base_batch_size=8,
                            optimizer_rule="sgd")  # fmt: skip
        _train(p, model, opt, ema, steps=8)

    add(area, "momentum_schedule returns nan at progress 0.5 (plain loop)", nan_schedule, "raise",
        ["momentum_schedule", "nan"])  # fmt: skip

    def past_total(p: Probe) -> None:
        model = _net()
        opt = _sgd(model)
        ema = lem.ScaledEMA(model, opt, momentum=0.9, momentum_schedule="cosine", final_momentum=1.0,
                            total_samples=16, base_batch_size=8, optimizer_rule="sgd")  # fmt: skip
        _train(p, model, opt, ema, steps=4)

    add(area, "training past total_samples (plain loop)", past_total, "raise", ["total_samples", "16"])

    def huge_base_no_rule(p: Probe) -> None:
        model = _net()
        opt = _sgd(model)
        ema = lem.ScaledEMA(model, opt, momentum=0.9, base_batch_size=HUGE)
        _train(p, model, opt, ema, steps=2)

    add(area, "base_batch_size=10**400, no optimizer rule", huge_base_no_rule, "raise",
        ["base_batch_size", V(HUGE)])  # fmt: skip

    def read_only_attr(p: Probe) -> None:
        model = _net()
        opt = _sgd(model)
        ema = lem.ScaledEMA(model, opt, **_merge(POLYAK, {"momentum_attributes": {"ro_momentum": 0.9}}))
        _train(p, model, opt, ema, steps=2)

    add(area, "read-only momentum attribute, at the first micro-batch", read_only_attr, "raise",
        ["momentum_attributes", "ro_momentum"])  # fmt: skip

    def clock_unset(p: Probe) -> None:
        model = _net()
        opt = _sgd(model)
        ema = lem.ScaledEMA(model, opt, **POLYAK)
        scheduler = lem.SampleClockLR(opt, lem.WarmupCosine(warmup=0.1), clock=ema)
        _train(p, model, opt, ema, 1)
        p.watch(module=model, optimizer=opt, ema=ema)
        scheduler.step()

    add(area, "SampleClockLR on a ScaledEMA without total_samples", clock_unset, "raise", ["total_samples"])

    # ---------------------------------------------------------------------- custom optimizer rules in a loop
    area = "rules.custom"
    rules: list[tuple[str, Any, Any, Any]] = [
        ("momentum=5.0", {"momentum": 5.0}, ["momentum", "5.0"], _sgd),
        ("momentum=-0.5", {"momentum": -0.5}, ["momentum", "-0.5"], _sgd),
        ("lr=nan", {"lr": NAN}, ["lr", "nan"], _sgd),
        ("lr=inf", {"lr": INF}, ["lr", "inf"], _sgd),
        ("lr=-0.1", {"lr": -0.1}, ["lr", "-0.1"], _sgd),
        ("lr=10**400", {"lr": HUGE}, ["lr", V(HUGE)], _sgd),
        ("lr='0.1'", {"lr": "0.1"}, ["lr", "'0.1'"], _sgd),
        ("lr=True", {"lr": True}, ["lr", "True"], _sgd),
        ("lr=None", {"lr": None}, ["lr", "None"], _sgd),
        ("weight_decay=nan", {"weight_decay": NAN}, ["weight_decay", "nan"], _sgd),
        ("returns None", None, ["scale", "None"], _sgd),
        ("returns a list", [("lr", 0.2)], ["scale", "[('lr', 0.2)]"], _sgd),
        ("returns params", {"params": []}, ["params"], _sgd),
        ("returns an unknown key", {"nope": 1.0}, ["'nope'"], _sgd),
        ("maximize=1 (a flag set to an int)", {"maximize": 1}, ["maximize", "1"], _sgd),
        ("Adam betas of length 1", {"betas": (0.9,)}, ["betas", "(0.9,)"], _adam),
        ("Adam betas=(1.5, 0.999)", {"betas": (1.5, 0.999)}, ["betas", "1.5"], _adam),
        ("Adam eps=-1e-8", {"eps": -1e-8}, ["eps", "-1e-08"], _adam),
    ]
    for label, values, tokens, optimizer in rules:

        def custom(p: Probe, values: Any = values, optimizer: Any = optimizer) -> None:
            model = _net()
            opt = optimizer(model)
            p.watch(module=model, optimizer=opt)
            ema = lem.ScaledEMA(model, opt, momentum=0.9, base_batch_size=8, optimizer_rule=CustomRule(values))
            _train(p, model, opt, ema, steps=2)

        add(area, f"custom rule returns {label}", custom, "raise", tokens)

    def wrong_types(p: Probe) -> None:
        class AdamOnly(lem.OptimizerRule):
            optimizer_types = (torch.optim.Adam,)

            def scale(self, group: Any, kappa: float) -> Any:
                return {}

        model = _net()
        opt = _sgd(model)
        p.watch(module=model, optimizer=opt)
        lem.ScaledEMA(model, opt, momentum=0.9, base_batch_size=8, optimizer_rule=AdamOnly())

    add(area, "custom rule for Adam only, given SGD", wrong_types, "raise", ["optimizer_rule", "SGD"])


# ------------------------------------------------------------------------------------- saved ScaledEMA states
def _trained(steps: int = 3, **kwargs: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    model = _net()
    opt = _sgd(model)
    ema = lem.ScaledEMA(model, opt, **_merge(POLYAK, kwargs))
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        ema.count_samples(8)
        opt.step()
    state = copy.deepcopy({k: ({n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v)
                           for k, v in ema.state_dict().items()})  # fmt: skip
    return model, opt, ema, state


def _first_float(averages: dict[str, Any]) -> str:
    return next(name for name, t in averages.items() if t.is_floating_point() and t.dim() > 1)


def _reg_load_state() -> None:
    area = "ScaledEMA.load_state_dict"

    def state_case(name: str, mutate: Callable[[dict[str, Any]], Any], tokens: Any, **kwargs: Any) -> None:
        def fn(p: Probe) -> None:
            model, opt, ema, state = _trained(**kwargs)
            out = mutate(state)
            state = out.value if isinstance(out, _Replace) else state if out is None else out
            p.watch(module=model, optimizer=opt, ema=ema)
            ema.load_state_dict(state)

        add(area, name, fn, "raise", tokens)

    state_case("a list", lambda s: [s], ["dict", "list"])
    state_case("None", lambda s: _Replace(None), ["dict", "None"])
    state_case("an empty dict", lambda s: _Replace({}), ["format"])
    for key in ("format", "base_batch_size", "samples_seen", "optimizer_steps", "ema_updates", "pending_decay", "ema"):
        state_case(f"missing {key!r}", lambda s, key=key: (s.pop(key), None)[1], [key])

    def setter(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda s: s.__setitem__(key, value)

    for key, values in (
        ("format", (2, "1", None, 0)),
        ("samples_seen", (-1, "24", 1.5, True, NAN, 10**30, HUGE)),
        ("optimizer_steps", (-1, "3", 2.5)),
        ("ema_updates", (99, -1)),
        ("pending_decay", (0, NAN, 1.5, "1", -0.5)),
    ):
        for value in values:
            state_case(f"{key}={_n(value)}", setter(key, value), [key, V(value)])
    for value in (0, -8, "8", 1.5, True, HUGE):
        state_case(f"base_batch_size={_n(value)} (base resolved from it)", setter("base_batch_size", value),
                   ["base_batch_size", V(value)], base_batch_size=None)  # fmt: skip
    state_case("optimizer_steps=0 with samples_seen>0", lambda s: s.update(optimizer_steps=0, ema_updates=0),
               ["optimizer_steps", "samples_seen"])  # fmt: skip
    state_case(
        "samples_seen < optimizer_steps", lambda s: s.update(samples_seen=1), ["samples_seen", "optimizer_steps"]
    )
    state_case("skipped_updates=-1", setter("skipped_updates", -1), ["skipped_updates", "-1"], skip_non_finite=True)
    state_case("ema is a list", lambda s: s.__setitem__("ema", list(s["ema"].values())), ["ema", "list"])
    state_case("ema is empty", setter("ema", {}), [("ema", "EMA"), "missing"])
    state_case("ema has an extra name", lambda s: s["ema"].__setitem__("extra.weight", torch.zeros(2)),
               ["extra.weight"])  # fmt: skip
    state_case("ema misses a name", lambda s: (s["ema"].pop("body.2.bias"), None)[1], ["body.2.bias"])

    def tensor_mutation(label: str, change: Callable[[Any], Any], tokens: Callable[[str], Any]) -> None:
        def mutate(s: dict[str, Any]) -> None:
            name = _first_float(s["ema"])
            s["ema"][name] = change(s["ema"][name])

        state_case(f"ema tensor {label}", mutate, tokens("body.0.weight"))

    tensor_mutation("with a NaN", lambda t: t.index_fill(-1, torch.tensor([0]), NAN), lambda n: [n, ("NaN", "nan",
                    "non-finite")])  # fmt: skip
    tensor_mutation("with an inf", lambda t: t.index_fill(-1, torch.tensor([0]), INF), lambda n: [n, ("inf",
                    "non-finite")])  # fmt: skip
    tensor_mutation("of dtype int64", lambda t: (t * 100).long(), lambda n: [n, "int64"])
    tensor_mutation("of dtype bool", lambda t: t > 0, lambda n: [n, "bool"])
    tensor_mutation("of another shape", lambda t: t[:, :2].clone(), lambda n: [n, "shape"])
    tensor_mutation("0-dimensional", lambda t: t.sum(), lambda n: [n, "shape"])
    tensor_mutation("as a list", lambda t: t.tolist(), lambda n: [n, "list"])

    def second_bad(s: dict[str, Any]) -> None:  # the first tensors fit, a later one does not
        s["ema"]["body.2.weight"] = torch.zeros(3, 3)

    state_case("ema: a later tensor of another shape", second_bad, ["body.2.weight", "shape"])
    state_case("power_ema in a Polyak state", lambda s: s.update(power_ema={"0.1": s["ema"]}, samples_at_update=24),
               ["power_ema"])  # fmt: skip

    def post_hoc_case(name: str, mutate: Callable[[dict[str, Any]], Any], tokens: Any) -> None:
        def fn(p: Probe) -> None:
            model = _net()
            opt = _sgd(model)
            ema = lem.ScaledEMA(model, opt, **_post_hoc_base(p))
            _train(p, model, opt, ema, steps=3)
            state = copy.deepcopy(ema.state_dict())
            mutate(state)
            p.watch(module=model, optimizer=opt, ema=ema, snaps=p.tmp / "snaps")
            ema.load_state_dict(state)

        add(area, name, fn, "raise", tokens)

    post_hoc_case("post-hoc: power_ema is a list", lambda s: s.__setitem__("power_ema", [1]), ["power_ema", "list"])
    post_hoc_case("post-hoc: missing samples_at_update", lambda s: s.pop("samples_at_update"), ["samples_at_update"])
    post_hoc_case("post-hoc: samples_at_update past samples_seen", lambda s: s.__setitem__("samples_at_update", 999),
                  ["samples_at_update", "999"])  # fmt: skip
    post_hoc_case("post-hoc: samples_at_update=-1", lambda s: s.__setitem__("samples_at_update", -1),
                  ["samples_at_update", "-1"])  # fmt: skip
    post_hoc_case("post-hoc: another sigma_rel", lambda s: s.__setitem__("power_ema", {"0.05": s["power_ema"]["0.05"],
                  "0.2": s["power_ema"]["0.1"]}), ["sigma_rel", "0.2"])  # fmt: skip
    post_hoc_case("post-hoc: a NaN in one power EMA", lambda s: s["power_ema"]["0.1"]["body.0.weight"].fill_(NAN),
                  ["body.0.weight", ("NaN", "non-finite")])  # fmt: skip
    post_hoc_case("post-hoc: an ema key instead", lambda s: s.update(ema=s.pop("power_ema")["0.1"]), ["ema"])


class _Replace:
    """Returned by a state mutation: use ``value`` as the whole state."""

    def __init__(self, value: Any) -> None:
        self.value = value


# ----------------------------------------------------------------------------------- callback constructors
def ctor_case(area: str, name: str, build: Callable[[Probe], Any], tokens: Any, expect: str = "raise") -> None:
    """A constructor called with a bad argument (nothing existed before: only a directory is watched)."""

    def fn(p: Probe) -> None:
        p.watch(tmp=p.tmp)
        build(p)

    add(area, name, fn, expect, tokens)


def _reg_callback_ctors() -> None:
    area = "EMAScalingCallback.__init__"

    def ema_cb(name: str, kwargs: dict[str, Any], tokens: Any, expect: str = "raise") -> None:
        ctor_case(area, name, lambda p: lem.EMAScalingCallback(**_merge({"momentum": 0.9}, kwargs)), tokens, expect)

    for value in ("0.9", -0.1, 1.0, NAN, True, HUGE):
        ema_cb(f"momentum={_n(value)}", {"momentum": value}, ["momentum", V(value)])
    for value in (0, -4, 4.5, "4", True, NAN, [4]):
        ema_cb(f"base_batch_size={value!r}", {"base_batch_size": value}, ["base_batch_size", V(value)])
    for value in ("lars", 1, "SGD ", True):
        ema_cb(f"optimizer_rule={value!r}", {"optimizer_rule": value}, ["optimizer_rule", V(value)])
    ctor_case(area, "optimizer_rule=OptimizerRule()", lambda p: lem.EMAScalingCallback(
        optimizer_rule=lem.OptimizerRule()), ["optimizer_rule", "OptimizerRule()"])  # fmt: skip
    for value in ("yes", 1, 0.0):
        ema_cb(f"evaluate_with_ema={value!r}", {"evaluate_with_ema": value}, ["evaluate_with_ema", V(value)])
    ema_cb("evaluate_with_ema=True in teacher mode", {"evaluate_with_ema": True, "teachers": {"a": "b"}},
           ["evaluate_with_ema", "teachers"])  # fmt: skip
    for value in (0, -2, 1.5, "2", True, None):
        ema_cb(f"update_every={value!r}", {"update_every": value}, ["update_every", V(value)])
    for value in (1, "no"):
        ema_cb(f"warmup={value!r}", {"warmup": value}, ["warmup", V(value)])
    for value in ("bf16", None):
        ema_cb(f"ema_precision={value!r}", {"ema_precision": value}, ["ema_precision", V(value)])
    for value in ("", "  ", None, 5, ["ema"]):
        ema_cb(f"name={value!r}", {"name": value}, ["name", V(value)])
    for value in ("step", None):
        ema_cb(f"momentum_schedule={value!r}", {"momentum_schedule": value}, ["momentum_schedule", V(value)])
    ema_cb("momentum_schedule callable returns nan", {"momentum_schedule": lambda p: NAN, "momentum": DROP},
           ["momentum_schedule", "nan"])  # fmt: skip
    for value in (1.5, NAN, "1"):
        ema_cb(f"final_momentum={value!r}", {"momentum_schedule": "cosine", "final_momentum": value},
               ["final_momentum", V(value)])  # fmt: skip
    for value in (0, -1, 2.5, "100", True, NAN):
        ema_cb(f"total_samples={value!r}", {"total_samples": value}, ["total_samples", V(value)])
    for value, shown in (({}, "{}"), ("backbone", "'backbone'"), ({"backbone": None}, "None")):
        ema_cb(f"teachers={value!r}", {"teachers": value}, ["teachers", shown])
    for value in ({}, {"c": 1.5}, {"c": "0.9"}):
        ema_cb(f"momentum_attributes={value!r}", {"momentum_attributes": value, "base_batch_size": 4},
               ["momentum_attributes", V(value) if not value else V(next(iter(value.values())))])  # fmt: skip
    ema_cb("momentum_attributes without base_batch_size", {"momentum_attributes": {"c": 0.9}},
           ["momentum_attributes", "base_batch_size"])  # fmt: skip
    for option in ("include", "exclude"):
        for value in ("net", [1], [""], ["a", "a"]):
            ema_cb(f"{option}={value!r}", {option: value}, [option, V(value[0]) if isinstance(value, list) and
                   len(value) == 1 else V(value)])  # fmt: skip
    for option in ("skip_non_finite", "freeze_teachers", "flat_parameters", "offload", "side_stream", "copy_on_swap"):
        for value in (1, None):
            ema_cb(f"{option}={value!r}", {option: value}, [option, V(value)])
    ema_cb("freeze_teachers=True without teachers", {"freeze_teachers": True}, ["freeze_teachers", "teachers"])
    ema_cb("base_batch_size=10**400 (construct only)", {"base_batch_size": HUGE}, ["base_batch_size", V(HUGE)])
    ema_cb("update_every=10**400 (construct only)", {"update_every": HUGE}, ["update_every", V(HUGE)], "warn")
    ema_cb("total_samples=10**400 (construct only)", {"total_samples": HUGE}, ["total_samples", V(HUGE)], "warn")

    # ----------------------------------------------------------------------------------------- post-hoc
    area = "PostHocEMACallback.__init__"

    def post(name: str, kwargs: Any, tokens: Any, expect: str = "raise") -> None:
        def fn(p: Probe) -> Any:
            given = _merge({"directory": p.tmp / "snaps"}, kwargs(p) if callable(kwargs) else kwargs)
            p.watch(tmp=p.tmp)
            return lem.PostHocEMACallback(**given)

        add(area, name, fn, expect, tokens)

    for value in (None, [], "0.1", [0.5], [NAN], [0.1, 0.1], [HUGE], [0], 0.1, [True]):
        shown = V(value[0]) if isinstance(value, list) and value and value != [0.1, 0.1] else V(value)
        post(f"sigma_rels={_n(value)}", {"sigma_rels": value}, ["sigma_rel", shown])
    for value in (0, -1, 1.5, True, "100", None, NAN):
        post(f"snapshot_every_samples={value!r}", {"snapshot_every_samples": value}, ["snapshot_every_samples",
             V(value)])  # fmt: skip
    post("snapshot_every_samples=10**400", {"snapshot_every_samples": HUGE}, ["snapshot_every_samples"], "warn")
    for value in (None, "", 5):
        post(f"directory={value!r}", {"directory": value}, ["directory", V(value)])

    def as_file(p: Probe) -> dict[str, Any]:
        (p.tmp / "file").write_text("x")
        return {"directory": p.tmp / "file"}

    def under_file(p: Probe) -> dict[str, Any]:
        (p.tmp / "file").write_text("x")
        return {"directory": p.tmp / "file" / "snaps"}

    post("directory is a file", as_file, ["directory", "file"])
    post("directory below a file", under_file, ["directory", "file"])
    post("directory with a NUL byte", lambda p: {"directory": str(p.tmp / "sn\x00aps")},
         ["directory", ("\\x00", "NUL", "null")])  # fmt: skip
    for value in (0, "8", HUGE):
        post(f"base_batch_size={_n(value)}", {"base_batch_size": value}, ["base_batch_size", V(value)])
    post("optimizer_rule='lars'", {"optimizer_rule": "lars"}, ["optimizer_rule", "'lars'"])
    post("optimizer_rule=OptimizerRule()", lambda p: {"optimizer_rule": lem.OptimizerRule()}, ["optimizer_rule"])
    post("update_every=0", {"update_every": 0}, ["update_every", "0"])
    for value in ("", None, 3):
        post(f"name={value!r}", {"name": value}, ["name", V(value)])
    post("total_samples=0", {"total_samples": 0}, ["total_samples", "0"])
    post("include='net'", {"include": "net"}, ["include", "'net'"])
    post("include=[]", {"include": []}, ["include"])
    post("exclude=[1]", {"exclude": [1]}, ["exclude", "1"])
    post("skip_non_finite=1", {"skip_non_finite": 1}, ["skip_non_finite", "1"])
    post("side_stream='yes'", {"side_stream": "yes"}, ["side_stream", "'yes'"])

    # ----------------------------------------------------------------------------------------- progressive
    area = "ProgressiveBatchCallback.__init__"
    schedules = (
        ({}, "{}"),
        (None, "None"),
        ([], "[]"),
        ([(0, 4)], "[(0, 4)]"),
        ({0: 0}, "0"),
        ({-1: 4}, "-1"),
        ({0: 1.5}, "1.5"),
        ({"0": 4}, "'0'"),
        ({0: True}, "True"),
        ({True: 4}, "True"),
        ({0: NAN}, "nan"),
        ({0: "4"}, "'4'"),
        ({0: HUGE}, V(HUGE)),
        ({0: -4}, "-4"),
    )
    for value, shown in schedules:
        ctor_case(area, f"schedule={_n(value)}", lambda p, value=value: lem.ProgressiveBatchCallback(value),
                  ["schedule", shown])  # fmt: skip
    ctor_case(area, "schedule={10**400: 4} (an epoch never reached)", lambda p: lem.ProgressiveBatchCallback(
        {HUGE: 4}), ["schedule", V(HUGE)], "warn")  # fmt: skip
    for value in ("batch", None, 1, "ACCUMULATION"):
        ctor_case(area, f"mode={value!r}", lambda p, value=value: lem.ProgressiveBatchCallback({0: 4}, mode=value),
                  ["mode", V(value)])  # fmt: skip
    for value in ("", None, 5, "  "):
        ctor_case(area, f"batch_arg_name={value!r}", lambda p, value=value: lem.ProgressiveBatchCallback(
            {0: 4}, batch_arg_name=value), ["batch_arg_name", V(value)])  # fmt: skip

    area = "ProgressiveBatchCallback.load_state_dict"
    good = {"format": 1, "epoch": 1, "initial": 4}
    for label, state, tokens in (
        ("a list", [good], ["dict", "list"]),
        ("None", None, ["dict", "None"]),
        ("format 2", {**good, "format": 2}, ["format", "2"]),
        ("missing epoch", {"format": 1, "initial": 4}, ["epoch"]),
        ("epoch=-1", {**good, "epoch": -1}, ["epoch", "-1"]),
        ("epoch='1'", {**good, "epoch": "1"}, ["epoch", "'1'"]),
        ("epoch=True", {**good, "epoch": True}, ["epoch", "True"]),
        ("epoch=1.5", {**good, "epoch": 1.5}, ["epoch", "1.5"]),
        ("epoch=10**400", {**good, "epoch": HUGE}, ["epoch", V(HUGE)]),
        ("initial=0", {**good, "initial": 0}, ["initial", "0"]),
        ("initial=nan", {**good, "initial": NAN}, ["initial", "nan"]),
        ("initial=10**400", {**good, "initial": HUGE}, ["initial", V(HUGE)]),
    ):

        def load(p: Probe, state: Any = state) -> None:
            callback = lem.ProgressiveBatchCallback({0: 4, 2: 8})
            p.watch(callback=callback)
            callback.load_state_dict(state)

        add(area, label, load, "raise", tokens)

    # ----------------------------------------------------------------------------------------- SampleClockLR
    area = "SampleClockLR"

    class Clock:
        def __init__(self, progress: Any) -> None:
            self.progress = progress

    def lr_case(name: str, build: Callable[[Any], Any], tokens: Any, then_step: bool = False) -> None:
        def fn(p: Probe) -> None:
            model = _net()
            opt = _sgd(model)
            p.watch(optimizer=opt)
            scheduler = build(opt)
            if then_step:
                p.watch(optimizer=opt)
                scheduler.step()

        add(area, name, fn, "raise", tokens)

    one = lambda progress: 1.0  # noqa: E731
    for label, make, shown in (("'sgd'", lambda o: "sgd", "'sgd'"), ("None", lambda o: None, "None"),
                               ("5", lambda o: 5, "5"), ("[optimizer]", lambda o: [o], "list")):  # fmt: skip
        lr_case(f"optimizer={label}", lambda o, make=make: lem.SampleClockLR(make(o), one, clock=Clock(0.0)),
                ["optimizer", shown])  # fmt: skip
    for label, schedule, shown in (
        ("None", None, "None"),
        ("5", 5, "5"),
        ("'cosine'", "cosine", "'cosine'"),
        ("returns nan", lambda progress: NAN, "nan"),
        ("returns -1", lambda progress: -1.0, "-1"),
        ("returns '1'", lambda progress: "1", "'1'"),
        ("returns None", lambda progress: None, "None"),
        ("returns 10**400", lambda progress: HUGE, V(HUGE)),
        ("returns inf", lambda progress: INF, "inf"),
        ("takes no argument", lambda: 1.0, "progress"),
    ):
        lr_case(f"schedule {label}", lambda o, schedule=schedule: lem.SampleClockLR(o, schedule, clock=Clock(0.0)),
                ["schedule", shown])  # fmt: skip
    for label, clock, shown in (("5", 5, "5"), ("'ema'", "ema", "'ema'"), ("object()", object(), "object")):
        lr_case(f"clock={label}", lambda o, clock=clock: lem.SampleClockLR(o, one, clock=clock), ["clock", shown])
    for value in (NAN, 1.5, -0.5, "0.5", None):
        lr_case(f"clock.progress={value!r}", lambda o, value=value: lem.SampleClockLR(o, one, clock=Clock(value)),
                ["progress", V(value)], then_step=True)  # fmt: skip
    for value in (-2, 1.5, "x", True, HUGE, 5):
        lr_case(f"last_epoch={_n(value)}", lambda o, value=value: lem.SampleClockLR(o, one, last_epoch=value),
                ["last_epoch", V(value)])  # fmt: skip

    def attach_bad(p: Probe) -> None:
        opt = _sgd(_net())
        scheduler = lem.SampleClockLR(opt, one)
        p.watch(optimizer=opt)
        scheduler.attach(5)

    add(area, "attach(5)", attach_bad, "raise", ["clock", "5"])

    def no_clock(p: Probe) -> None:
        opt = _sgd(_net())
        scheduler = lem.SampleClockLR(opt, one)
        p.watch(optimizer=opt)
        scheduler.step()

    add(area, "step() without a clock", no_clock, "raise", ["clock"])


# ---------------------------------------------------------------------------------------- plain functions
def call_case(area: str, name: str, call: Callable[[], Any], tokens: Any, expect: str = "raise") -> None:
    """A pure function: no state to watch; a returned value is shown when it should have raised."""
    add(area, name, lambda p: call(), expect, tokens)


def _reg_functions() -> None:
    area = "functional"
    f = lem
    for value in (NAN, -0.1, 1.5, "0.9", True, None, HUGE, INF):
        call_case(area, f"scale_ema_momentum(momentum={_n(value)})", lambda v=value: f.scale_ema_momentum(v, 2.0),
                  ["momentum", V(value)])  # fmt: skip
    for value in (0, -1, NAN, INF, "2", True, None, HUGE):
        call_case(area, f"scale_ema_momentum(kappa={_n(value)})", lambda v=value: f.scale_ema_momentum(0.9, v),
                  ["kappa", V(value)])  # fmt: skip
    for value in (0, -1, NAN, INF, "64", True, HUGE):
        call_case(area, f"momentum_from_half_life(half_life_samples={_n(value)})",
                  lambda v=value: f.momentum_from_half_life(v, 8), ["half_life_samples", V(value)])  # fmt: skip
    for value in (0, NAN, "8", HUGE):
        call_case(area, f"momentum_from_half_life(batch_size={_n(value)})",
                  lambda v=value: f.momentum_from_half_life(64, v), ["batch_size", V(value)])  # fmt: skip
    for value in (NAN, 1.5, "0.9", HUGE, -1):
        call_case(area, f"half_life_from_momentum(momentum={_n(value)})",
                  lambda v=value: f.half_life_from_momentum(v, 8), ["momentum", V(value)])  # fmt: skip
    for value in (0, NAN, HUGE, "8", -8):
        call_case(area, f"half_life_from_momentum(batch_size={_n(value)})",
                  lambda v=value: f.half_life_from_momentum(0.9, v), ["batch_size", V(value)])  # fmt: skip
    for value in (NAN, 2, "0.9", -0.5):
        call_case(area, f"warmup_momentum(momentum={value!r})", lambda v=value: f.warmup_momentum(v, 1.0),
                  ["momentum", V(value)])  # fmt: skip
    for value in (-1, NAN, INF, "1", HUGE, None):
        call_case(area, f"warmup_momentum(base_steps={_n(value)})", lambda v=value: f.warmup_momentum(0.9, v),
                  ["base_steps", V(value)])  # fmt: skip

    area = "schedules"
    for value in (-0.1, 1.1, NAN, "0.5", True, None, HUGE):
        call_case(area, f"cosine_schedule(progress={_n(value)})", lambda v=value: f.cosine_schedule(v, 0.9, 1.0),
                  ["progress", V(value)])  # fmt: skip
    for value in (NAN, INF, "1", HUGE):
        call_case(area, f"cosine_schedule(start={_n(value)})", lambda v=value: f.cosine_schedule(0.5, v, 1.0),
                  ["start", V(value)])  # fmt: skip
    for value in (NAN, -INF):
        call_case(area, f"cosine_schedule(end={value!r})", lambda v=value: f.cosine_schedule(0.5, 0.9, v),
                  ["end", V(value)])  # fmt: skip

    def overflow(p: Probe) -> None:
        value = f.cosine_schedule(0.5, 1e308, -1e308)
        if value == 0.0:
            p.handled("the midpoint 0.0, computed without overflow")
        else:
            p.wrong(f"returned {value!r}, the midpoint is 0.0")

    add(area, "cosine_schedule(0.5, 1e308, -1e308) (overflow in the naive formula)", overflow, "raise",
        [("start", "end"), ("1e+308", "inf", "overflow")])  # fmt: skip
    for option, values in (("warmup", (1.0, -0.1, NAN, "0.1", True, HUGE)), ("final", (1.5, NAN)),
                           ("warmup_start", (2, -1))):  # fmt: skip
        for value in values:
            call_case(area, f"WarmupCosine({option}={_n(value)})",
                      lambda o=option, v=value: f.WarmupCosine(**{o: v}), [option, V(value)])  # fmt: skip
    for value in (1.5, "0.5", NAN, None):
        call_case(area, f"WarmupCosine()({value!r})", lambda v=value: f.WarmupCosine(warmup=0.1)(v),
                  ["progress", V(value)])  # fmt: skip
    from_schedules = __import__("lightning_emascale.schedules", fromlist=["x"])
    call_case(
        area,
        "check_batch_schedule({0: 0}, name='sched')",
        lambda: from_schedules.check_batch_schedule({0: 0}, name="sched"),
        ["sched", "0"],
    )
    call_case(
        area,
        "batch_size_at({0: 4}, epoch='1', default=2)",
        lambda: from_schedules.batch_size_at({0: 4}, "1", default=2),
        ["epoch", "'1'"],
    )
    call_case(
        area,
        "batch_size_at({0: 4}, epoch=None, default=2)",
        lambda: from_schedules.batch_size_at({0: 4}, None, default=2),
        ["epoch", "None"],
    )
    call_case(
        area,
        "batch_size_at({2: 4}, epoch=0, default=0)",
        lambda: from_schedules.batch_size_at({2: 4}, 0, default=0),
        ["default", "0"],
    )
    call_case(
        area,
        "batch_size_at({'a': 4}, epoch=0, default=2)",
        lambda: from_schedules.batch_size_at({"a": 4}, 0, default=2),
        ["schedule", "'a'"],
    )

    area = "rules"
    group = {"lr": 0.1, "momentum": 0.9}
    adam_group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    for value in (0, -1, NAN, INF, "2", True, HUGE):
        call_case(area, f"SGDScalingRule().scale(kappa={_n(value)})",
                  lambda v=value: f.SGDScalingRule().scale(dict(group), v), ["kappa", V(value)])  # fmt: skip
    for value in (NAN, -1, "2", 0):
        call_case(area, f"NoScalingRule().scale(kappa={value!r})",
                  lambda v=value: f.NoScalingRule().scale(dict(group), v), ["kappa", V(value)])  # fmt: skip
    for value in (NAN, 0, HUGE):
        call_case(area, f"AdamScalingRule().scale(kappa={_n(value)})",
                  lambda v=value: f.AdamScalingRule().scale(dict(adam_group), v), ["kappa", V(value)])  # fmt: skip
    call_case(area, "AdamScalingRule at kappa=10 (beta1 0.9)", lambda: f.AdamScalingRule().scale(dict(adam_group), 10),
              ["betas[0]", "0.9", "kappa"])  # fmt: skip
    call_case(area, "SGDScalingRule().scale({}, 2)", lambda: f.SGDScalingRule().scale({}, 2), ["lr"])
    call_case(area, "SGDScalingRule().scale({'lr': '0.1'}, 2)", lambda: f.SGDScalingRule().scale({"lr": "0.1"}, 2),
              ["lr", "'0.1'"])  # fmt: skip
    call_case(area, "SGDScalingRule().scale({'lr': None}, 2)", lambda: f.SGDScalingRule().scale({"lr": None}, 2),
              ["lr", "None"])  # fmt: skip
    for label, changed, tokens in (
        ("betas=(1.0, 0.999)", {"betas": (1.0, 0.999)}, ["betas[0]", "1.0"]),
        ("betas=('0.9', 0.999)", {"betas": ("0.9", 0.999)}, ["betas", "'0.9'"]),
        ("betas=(nan, 0.999)", {"betas": (NAN, 0.999)}, ["betas[0]", "nan"]),
        ("betas=0.9", {"betas": 0.9}, ["betas", "0.9"]),
        ("eps='x'", {"eps": "x"}, ["eps", "'x'"]),
        ("eps=nan", {"eps": NAN}, ["eps", "nan"]),
        ("lr=nan", {"lr": NAN}, ["lr", "nan"]),
    ):
        call_case(area, f"AdamScalingRule().scale(group with {label})",
                  lambda c=changed: f.AdamScalingRule().scale({**adam_group, **c}, 2.0), tokens)  # fmt: skip
    call_case(area, "OptimizerRule().scale(...) (the base class)", lambda: f.OptimizerRule().scale(dict(group), 2.0),
              ["OptimizerRule", "scale"])  # fmt: skip
    rules_module = __import__("lightning_emascale.rules", fromlist=["x"])
    for value in ("lars", 5, "", b"sgd"):
        call_case(area, f"resolve_rule({value!r})", lambda v=value: rules_module.resolve_rule(v),
                  ["optimizer_rule", V(value)])  # fmt: skip
    call_case(area, "resolve_rule(SGDScalingRule) (the class)", lambda: rules_module.resolve_rule(f.SGDScalingRule),
              ["optimizer_rule", "SGDScalingRule"])  # fmt: skip
    call_case(area, "resolve_rule(OptimizerRule())", lambda: rules_module.resolve_rule(f.OptimizerRule()),
              ["optimizer_rule", "scale"])  # fmt: skip

    def scaled(rule: Any, kappa: Any = 2.0, groups: Any = None) -> Callable[[Probe], None]:
        def fn(p: Probe) -> None:
            opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.9)
            given = opt.param_groups if groups is None else groups
            p.watch(optimizer=opt)
            rules_module.scale_param_groups(rule() if callable(rule) else rule, given, kappa)

        return fn

    add(area, "scale_param_groups(SGD rule, kappa=nan)", scaled(lambda: f.SGDScalingRule(), NAN), "raise",
        ["kappa", "nan"])  # fmt: skip
    add(area, "scale_param_groups(custom momentum=5.0)", scaled(lambda: CustomRule({"momentum": 5.0})), "raise",
        ["momentum", "5.0"])  # fmt: skip
    add(area, "scale_param_groups(custom lr=10**400)", scaled(lambda: CustomRule({"lr": HUGE})), "raise",
        ["lr", V(HUGE)])  # fmt: skip
    add(area, "scale_param_groups(NoScalingRule, kappa=-1)", scaled(lambda: f.NoScalingRule(), -1), "raise",
        ["kappa", "-1"])  # fmt: skip

    def fits(p: Probe) -> None:
        rules_module.check_rule_fits(f.SGDScalingRule(), [torch.optim.Adam(torch.nn.Linear(2, 1).parameters())])

    add(area, "check_rule_fits(SGD rule, [Adam])", fits, "raise", ["optimizer_rule", "Adam"])
    add(area, "check_rule_fits(SGD rule, ['sgd'])", lambda p: rules_module.check_rule_fits(f.SGDScalingRule(),
        ["sgd"]), "raise", ["optimizer", "'sgd'"])  # fmt: skip


# -------------------------------------------------------------------------------------- reconstruct_post_hoc
def _reg_post_hoc() -> None:
    area = "reconstruct_post_hoc"

    def recon(name: str, prepare: Callable[[Path], Any], tokens: Any, **kwargs: Any) -> None:
        def fn(p: Probe) -> Any:
            directory = prepare(p.tmp)
            p.watch(dir=p.tmp)
            result = lem.reconstruct_post_hoc(directory, **({"sigma_rel": 0.08} | kwargs))
            return f"PostHocReconstruction(residual={result.residual:.3g}, at_samples={result.at_samples})"

        add(area, name, fn, "raise", tokens)

    def run_a(tmp: Path) -> Path:
        return _copy_run(_run_a(), tmp / "a")

    def edit(samples: int, change: Callable[[dict[str, Any]], Any], name: str | None = None) -> Callable[[Path], Path]:
        def prepare(tmp: Path) -> Path:
            folder = run_a(tmp)
            snap = torch.load(folder / _snap_name(samples), weights_only=True)
            out = change(snap)
            snap = out if out is not None else snap
            (folder / _snap_name(samples)).unlink()
            torch.save(snap, folder / (name or _snap_name(samples)))
            return folder

        return prepare

    recon("a missing directory", lambda tmp: tmp / "nope", ["nope", ("exist", "not found", "No such")])
    recon("a file path", lambda tmp: (tmp / "file.pt").write_text("x") and tmp / "file.pt",
          ["file.pt", ("not a directory", "is a file", "a file")])  # fmt: skip
    recon("an empty directory", lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", ["empty", "snapshots"])
    recon("directory=5", lambda tmp: 5, ["directory", "5"])
    recon("directory=None", lambda tmp: None, ["directory", "None"])
    recon("a NUL byte in the path", lambda tmp: str(tmp / "a\x00b"), ["directory", ("\\x00", "NUL", "null")])

    def garbage(tmp: Path) -> Path:
        folder = run_a(tmp)
        (folder / _snap_name(32)).write_bytes(b"not a snapshot")
        return folder

    def truncated(tmp: Path) -> Path:
        folder = run_a(tmp)
        data = (folder / _snap_name(32)).read_bytes()
        (folder / _snap_name(32)).write_bytes(data[: len(data) // 2])
        return folder

    recon("a garbage snapshot", garbage, [_snap_name(32)])
    recon("a truncated snapshot", truncated, [_snap_name(32)])
    recon("a snapshot that is a tensor", edit(32, lambda s: torch.zeros(2)), [_snap_name(32), ("format", "dict")])
    recon("a snapshot of format 2", edit(32, lambda s: s.update(format=2)), [_snap_name(32), "format"])
    recon("a snapshot without averages", edit(32, lambda s: s.pop("averages") and None), [_snap_name(32),
          "averages"])  # fmt: skip
    recon("a snapshot with one EMA for two sigma_rels", edit(32, lambda s: s["averages"].pop() and None),
          [_snap_name(32)])  # fmt: skip
    recon("a snapshot with a NaN", edit(32, lambda s: (s["averages"][0]["body.0.weight"].fill_(NAN), None)[1]),
          [_snap_name(32), "body.0.weight"])  # fmt: skip

    def to_int(snap: dict[str, Any]) -> None:
        snap["averages"] = [{k: (v * 100).long() for k, v in averages.items()} for averages in snap["averages"]]

    recon("integer tensors where floats belong", edit(32, to_int), [_snap_name(32), ("int64", "dtype")])
    recon("samples field contradicts the file name", edit(32, lambda s: s.update(samples=40)),
          [_snap_name(32), "samples"])  # fmt: skip
    recon("swapped sigma_rel labels", edit(32, lambda s: s.update(sigma_rels=s["sigma_rels"][::-1])),
          [_snap_name(32), "sigma_rel"])  # fmt: skip
    recon("sigma_rels of a string", edit(32, lambda s: s.update(sigma_rels="ab")), [_snap_name(32), "sigma_rels"])

    def duplicate(tmp: Path) -> Path:
        folder = run_a(tmp)
        shutil.copy(folder / _snap_name(32), folder / "post_hoc-32.pt")
        return folder

    recon("a duplicate step under another file name", duplicate, [("post_hoc-32.pt",)])

    def mixed(other: Callable[[], Path]) -> Callable[[Path], Path]:
        def prepare(tmp: Path) -> Path:
            folder = run_a(tmp)
            for file in other().iterdir():
                shutil.copy(file, folder / file.name)
            return folder

        return prepare

    run_b = lambda: _make_run("b", 1, (0.05, 0.1), every=24, steps=5)  # noqa: E731  24, 40
    run_c = lambda: _make_run("c", 0, (0.05, 0.1), every=20, steps=5, arch="linear")  # noqa: E731  20, 40
    run_d = lambda: _make_run("d", 2, (0.07, 0.12), every=24, steps=5)  # noqa: E731  24, 40
    recon("two runs of different architectures", mixed(run_c), ["post_hoc-", ("run", "mixed")])
    recon("two runs of the same architecture", mixed(run_b), ["post_hoc-", ("run", "mixed")])
    recon("interleaved sigma_rels of two runs", mixed(run_d), ["post_hoc-", ("sigma_rel", "run", "mixed")])
    for label, kwargs, tokens in (
        ("sigma_rel and half_life_samples", {"half_life_samples": 100.0}, ["sigma_rel", "half_life_samples"]),
        ("neither target", {"sigma_rel": None}, ["sigma_rel", "half_life_samples"]),
        ("sigma_rel=0.5", {"sigma_rel": 0.5}, ["sigma_rel", "0.5"]),
        ("sigma_rel=nan", {"sigma_rel": NAN}, ["sigma_rel", "nan"]),
        ("sigma_rel='0.1'", {"sigma_rel": "0.1"}, ["sigma_rel", "'0.1'"]),
        ("sigma_rel=10**400", {"sigma_rel": HUGE}, ["sigma_rel", V(HUGE)]),
        ("sigma_rel=0", {"sigma_rel": 0}, ["sigma_rel", "0"]),
        ("half_life_samples=0", {"sigma_rel": None, "half_life_samples": 0}, ["half_life_samples", "0"]),
        ("half_life_samples=nan", {"sigma_rel": None, "half_life_samples": NAN}, ["half_life_samples", "nan"]),
        ("half_life_samples=inf", {"sigma_rel": None, "half_life_samples": INF}, ["half_life_samples", "inf"]),
        ("half_life_samples=10**400", {"sigma_rel": None, "half_life_samples": HUGE}, ["half_life_samples", V(HUGE)]),
        ("at_samples=0", {"at_samples": 0}, ["at_samples", "0"]),
        ("at_samples=49", {"at_samples": 49}, ["at_samples", "49"]),
        ("at_samples='48'", {"at_samples": "48"}, ["at_samples", "'48'"]),
        ("at_samples=True", {"at_samples": True}, ["at_samples", "True"]),
        ("at_samples=32.5", {"at_samples": 32.5}, ["at_samples", "32.5"]),
        ("at_samples=10**400", {"at_samples": HUGE}, ["at_samples", V(HUGE)]),
    ):
        recon(label, run_a, tokens, **kwargs)


# ----------------------------------------------------------------------------------------- Lightning fits
def _reg_fits() -> None:
    area = "fit.resume"

    def resume(
        name: str,
        mutate: Callable[[dict[str, Any]], Any] | None,
        callbacks: Callable[[Probe], list[Any]],
        tokens: Any,
        weights_only: bool = False,
    ) -> None:
        """Resume from the base checkpoint, changed by ``mutate``, with ``callbacks``. The module first gets the
        checkpoint's ``state_dict`` (what Lightning loads into it anyway), so the watched module changes only where
        a callback writes into it. ``weights_only``: the question is only which weights the run resumes from, so
        accepting is fine (``ok``) where it trains on from the training weights (``raw_state_dict``)."""

        def fn(p: Probe) -> None:
            original = _checkpoint()
            checkpoint = _checkpoint()
            if mutate is not None:
                out = mutate(checkpoint)
                checkpoint = checkpoint if out is None else out
            path = p.tmp / "resume.ckpt"
            torch.save(checkpoint, path)
            model = Boring()
            model.load_state_dict(checkpoint["state_dict"])
            given = callbacks(p)
            recorder = StartRecorder()
            p.watch(module=model, **{f"callback{i}": CountersOf(c) for i, c in enumerate(given)})
            _trainer([*given, recorder], max_steps=6).fit(model, ckpt_path=path)
            raw = original["callbacks"][EMA_KEY]["raw_state_dict"]
            if recorder.weights is None:
                p.wrong("training never started")
            elif _floats_equal(recorder.weights, raw):
                if weights_only:
                    p.handled("the run trained on from the checkpoint's training weights")
            elif _floats_equal(recorder.weights, original["state_dict"]):
                p.wrong("the run trained on from the EMA held in the checkpoint's state_dict")
            else:
                p.wrong("the run trained on from weights that are neither the training weights nor the EMA")

        add(area, name, fn, "raise", tokens)

    ema = lambda p: [lem.EMAScalingCallback(momentum=0.9, base_batch_size=4)]  # noqa: E731

    def drop_raw(ck: dict[str, Any]) -> None:
        del ck["callbacks"][EMA_KEY]["raw_state_dict"]

    def set_state(value: Any) -> Callable[[dict[str, Any]], None]:
        def mutate(ck: dict[str, Any]) -> None:
            ck["callbacks"][EMA_KEY] = value

        return mutate

    def change(fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], None]:
        def mutate(ck: dict[str, Any]) -> None:
            fn(ck["callbacks"][EMA_KEY])

        return mutate

    resume("callback state lacks raw_state_dict", drop_raw, ema, ["raw_state_dict"], weights_only=True)
    resume("resume with a callback of another name", None,
           lambda p: [lem.EMAScalingCallback(momentum=0.9, base_batch_size=4, name="other")],
           [EMA_KEY, "name"], weights_only=True)  # fmt: skip
    resume("resume with PostHocEMACallback instead", None,
           lambda p: [lem.PostHocEMACallback(directory=p.tmp / "snaps", snapshot_every_samples=8, base_batch_size=4)],
           [EMA_KEY], weights_only=True)  # fmt: skip
    resume("callback state is None", set_state(None), ema, [EMA_KEY, "None"], weights_only=True)
    resume("callback state is a list", set_state([1, 2]), ema, [EMA_KEY, "list"])
    resume("callback state is a string", set_state("corrupt"), ema, [EMA_KEY, "str"])
    for key in ("samples_seen", "ema", "format"):
        resume(f"callback state lacks {key!r}", change(lambda s, key=key: s.pop(key)), ema, [EMA_KEY, key])
    for key, value in (("format", 2), ("samples_seen", -1), ("samples_seen", 10**30), ("ema_updates", 99),
                       ("pending_decay", NAN), ("base_batch_size", 0), ("optimizer_steps", "4")):  # fmt: skip
        resume(f"callback state {key}={value!r}", change(lambda s, key=key, value=value: s.__setitem__(key, value)),
               ema, [key, V(value)])  # fmt: skip
    resume(
        "callback state optimizer_steps=0 with samples_seen>0",
        change(lambda s: s.update(optimizer_steps=0, ema_updates=0)),
        ema,
        ["optimizer_steps", "samples_seen"],
    )

    def ema_tensor(fn: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
        return change(lambda s: s["ema"].__setitem__("net.0.weight", fn(s["ema"]["net.0.weight"])))

    def raw_tensor(fn: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
        return change(
            lambda s: s["raw_state_dict"].__setitem__("net.0.weight", fn(s["raw_state_dict"]["net.0.weight"]))
        )

    resume("ema tensor of another shape", ema_tensor(lambda t: t[:, :2].clone()), ema, ["net.0.weight", "shape"])
    resume("ema tensor with a NaN", ema_tensor(lambda t: t.fill_(NAN)), ema, ["net.0.weight", ("NaN", "non-finite")])
    resume("ema tensor of dtype int64", ema_tensor(lambda t: (t * 100).long()), ema, ["net.0.weight", "int64"])
    resume("ema tensor of dtype bool", ema_tensor(lambda t: t > 0), ema, ["net.0.weight", "bool"])
    resume("ema misses a tensor", change(lambda s: s["ema"].pop("net.2.bias")), ema, ["net.2.bias"])
    resume("power_ema in a Polyak state", change(lambda s: s.update(power_ema={"0.1": s.pop("ema")},
           samples_at_update=16)), ema, [("power_ema", "'ema'"), "mode"])  # fmt: skip
    resume("raw_state_dict with a NaN", raw_tensor(lambda t: t.fill_(NAN)), ema, ["raw_state_dict",
           ("NaN", "non-finite")])  # fmt: skip
    resume("raw_state_dict tensor of another shape", raw_tensor(lambda t: t[:, :2].clone()), ema,
           ["raw_state_dict", "net.0.weight"])  # fmt: skip
    resume("raw_state_dict with an unexpected key",
           change(lambda s: s["raw_state_dict"].__setitem__("extra.weight", torch.zeros(2))), ema,
           ["raw_state_dict", "extra.weight"])  # fmt: skip
    resume("raw_state_dict is a list", change(lambda s: s.__setitem__("raw_state_dict", [1])), ema,
           ["raw_state_dict", "list"])  # fmt: skip

    area = "fit"

    def fit_case(name: str, build: Callable[[Probe], tuple[Any, list[Any], dict[str, Any]]], tokens: Any,
                 expect: str = "raise") -> None:  # fmt: skip
        def fn(p: Probe) -> None:
            model, callbacks, kwargs = build(p)
            p.watch(module=model, **{f"callback{i}": CountersOf(c) for i, c in enumerate(callbacks)})
            _trainer(callbacks, **kwargs).fit(model)

        add(area, name, fn, expect, tokens)

    fit_case("two EMAScalingCallbacks with the same name", lambda p: (Boring(), [
        lem.EMAScalingCallback(momentum=0.9), lem.EMAScalingCallback(momentum=0.99, evaluate_with_ema=False)], {}),
        ["name", "'ema'"])  # fmt: skip
    fit_case("custom batch_sampler yields more samples than len(sampler)", lambda p: (GreedyBoring(), [
        lem.EMAScalingCallback(momentum=0.9, momentum_schedule="cosine", final_momentum=1.0, base_batch_size=4)],
        {"max_steps": -1, "max_epochs": 1}), [("sampler",)])  # fmt: skip
    fit_case("freeze_teachers=True, then the rule does not fit", lambda p: (TeacherBoring(), [
        lem.EMAScalingCallback(momentum=0.9, teachers={"backbone": "backbone_momentum"}, freeze_teachers=True,
                               optimizer_rule="adam")], {}), ["optimizer_rule", "SGD"])  # fmt: skip
    fit_case("teacher still trainable (no freeze_teachers)", lambda p: (TeacherBoring(), [
        lem.EMAScalingCallback(momentum=0.9, teachers={"backbone": "backbone_momentum"})], {}),
        ["backbone_momentum", "requires grad"])  # fmt: skip
    fit_case("total_samples larger than the run", lambda p: (Boring(), [
        lem.EMAScalingCallback(momentum=0.9, momentum_schedule="cosine", final_momentum=1.0, total_samples=10**6)],
        {"max_steps": -1, "max_epochs": 1}), ["total_samples", "1000000"], "warn")  # fmt: skip
    fit_case("total_samples=10**400", lambda p: (Boring(), [
        lem.EMAScalingCallback(momentum=0.9, momentum_schedule="cosine", final_momentum=1.0, total_samples=HUGE)],
        {"max_steps": -1, "max_epochs": 1}), ["total_samples", V(HUGE)], "warn")  # fmt: skip
    fit_case("total_samples smaller than the run", lambda p: (Boring(), [
        lem.EMAScalingCallback(momentum=0.9, momentum_schedule="cosine", final_momentum=1.0, total_samples=16)],
        {"max_steps": -1, "max_epochs": 1}), ["total_samples", "16"])  # fmt: skip
    fit_case(
        "base_batch_size=10**400",
        lambda p: (Boring(), [lem.EMAScalingCallback(momentum=0.9, base_batch_size=HUGE)], {}),
        ["base_batch_size", V(HUGE)],
    )
    fit_case("base_batch_size=10**400 with rule 'sgd'", lambda p: (Boring(), [
        lem.EMAScalingCallback(momentum=0.9, base_batch_size=HUGE, optimizer_rule="sgd")], {}),
        ["base_batch_size", V(HUGE)])  # fmt: skip
    fit_case(
        "update_every larger than the run",
        lambda p: (Boring(), [lem.EMAScalingCallback(momentum=0.9, update_every=100)], {}),
        ["update_every", "100"],
        "warn",
    )
    fit_case("cosine momentum with max_steps only", lambda p: (Boring(), [
        lem.EMAScalingCallback(momentum=0.9, momentum_schedule="cosine", final_momentum=1.0)], {"max_steps": 4}),
        ["total_samples"])  # fmt: skip
    fit_case("momentum_attributes path missing on the module", lambda p: (Boring(), [
        lem.EMAScalingCallback(momentum=0.9, base_batch_size=4, momentum_attributes={"nope": 0.9})], {}),
        ["momentum_attributes", "'nope'"])  # fmt: skip
    fit_case("include names nothing in the module", lambda p: (Boring(), [
        lem.EMAScalingCallback(momentum=0.9, include=["nope"])], {}), ["include", "'nope'"])  # fmt: skip
    fit_case(
        "optimizer_rule='adam' with SGD",
        lambda p: (Boring(), [lem.EMAScalingCallback(momentum=0.9, optimizer_rule="adam")], {}),
        ["optimizer_rule", "SGD"],
    )
    fit_case(
        "ProgressiveBatchCallback: batch_arg_name missing",
        lambda p: (Boring(), [lem.ProgressiveBatchCallback({0: 8}, batch_arg_name="bs")], {}),
        ["batch_arg_name", "'bs'"],
    )
    fit_case("ProgressiveBatchCallback: schedule={0: 10**400}", lambda p: (Boring(), [
        lem.ProgressiveBatchCallback({0: HUGE})], {}), ["schedule", V(HUGE)])  # fmt: skip
    fit_case("ProgressiveBatchCallback accumulation: not a multiple", lambda p: (Boring(), [
        lem.ProgressiveBatchCallback({0: 6}, mode="accumulation")], {}), ["6", "4"])  # fmt: skip

    def no_clock(p: Probe) -> tuple[Any, list[Any], dict[str, Any]]:
        class Scheduled(Boring):
            def configure_optimizers(self) -> Any:
                optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
                scheduler = lem.SampleClockLR(optimizer, lem.WarmupCosine(warmup=0.1))
                return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        return Scheduled(), [], {}

    fit_case("SampleClockLR without an EMA callback", no_clock, ["clock"])

    def post_hoc_dir_taken(p: Probe) -> tuple[Any, list[Any], dict[str, Any]]:
        folder = _copy_run(_run_a(), p.tmp / "snaps")
        return Boring(), [lem.PostHocEMACallback(directory=folder, snapshot_every_samples=8, base_batch_size=4)], {}

    fit_case("PostHocEMACallback: directory of another run", post_hoc_dir_taken, ["directory", "snaps"])

    def post_hoc_nul(p: Probe) -> tuple[Any, list[Any], dict[str, Any]]:
        directory = str(p.tmp / "sn\x00aps")
        return Boring(), [lem.PostHocEMACallback(directory=directory, snapshot_every_samples=8, base_batch_size=4)], {}

    fit_case("PostHocEMACallback: directory with a NUL byte", post_hoc_nul, ["directory", ("\\x00", "NUL", "null")])

    # ------------------------------------------------------------------------ EMAScalingCallback.load_state_dict
    area = "EMAScalingCallback.load_state_dict"

    def cb_state() -> dict[str, Any]:
        return _checkpoint()["callbacks"][EMA_KEY]

    def before_fit(name: str, mutate: Callable[[dict[str, Any]], Any], tokens: Any) -> None:
        def fn(p: Probe) -> None:
            callback = lem.EMAScalingCallback(momentum=0.9, base_batch_size=4)
            state = cb_state()
            out = mutate(state)
            state = state if out is None else out.value if isinstance(out, _Replace) else out
            p.watch(callback=callback)
            callback.load_state_dict(state)

        add(area, f"before fit: {name}", fn, "raise", tokens)

    before_fit("a list", lambda s: [s], ["dict", "list"])
    before_fit("None", lambda s: _Replace(None), ["dict", "None"])
    before_fit("format 2", lambda s: s.update(format=2), ["format", "2"])
    before_fit("lacks samples_seen", lambda s: (s.pop("samples_seen"), None)[1], ["samples_seen"])
    before_fit("samples_seen=-1", lambda s: s.update(samples_seen=-1), ["samples_seen", "-1"])
    before_fit("samples_seen=10**30", lambda s: s.update(samples_seen=10**30), ["samples_seen", V(10**30)])
    before_fit("optimizer_steps=0 with samples_seen>0", lambda s: s.update(optimizer_steps=0, ema_updates=0),
               ["optimizer_steps", "samples_seen"])  # fmt: skip
    before_fit("ema_updates > optimizer_steps", lambda s: s.update(ema_updates=99), ["ema_updates", "99"])
    before_fit("ema is a list", lambda s: s.update(ema=[1]), ["ema", "list"])
    before_fit("ema with a NaN", lambda s: (s["ema"]["net.0.weight"].fill_(NAN), None)[1], ["net.0.weight"])

    def after_fit(name: str, mutate: Callable[[dict[str, Any]], Any], tokens: Any) -> None:
        def fn(p: Probe) -> None:
            model, callback = _fitted()
            state = {k: ({n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v)
                     for k, v in callback.state_dict().items()}  # fmt: skip
            out = mutate(state)
            state = state if out is None else out
            p.watch(module=model, callback=callback)
            callback.load_state_dict(state)

        add(area, f"after fit: {name}", fn, "raise", tokens)

    after_fit("ema tensor of dtype int64", lambda s: s["ema"].__setitem__("net.0.weight",
              (s["ema"]["net.0.weight"] * 100).long()), ["net.0.weight", "int64"])  # fmt: skip
    after_fit("ema tensor of another shape", lambda s: s["ema"].__setitem__("net.0.weight", torch.zeros(2, 2)),
              ["net.0.weight", "shape"])  # fmt: skip
    after_fit("ema misses a tensor", lambda s: (s["ema"].pop("net.2.bias"), None)[1], ["net.2.bias"])
    after_fit("samples_seen=10**30", lambda s: s.update(samples_seen=10**30), ["samples_seen", V(10**30)])
    after_fit("pending_decay=nan", lambda s: s.update(pending_decay=NAN), ["pending_decay", "nan"])
    after_fit("a list", lambda s: [s], ["dict", "list"])


# ==================================================================================================== main
def register() -> None:
    if CASES:
        return
    _reg_scaled_ema_init()
    _reg_scaled_ema_runtime()
    _reg_load_state()
    _reg_callback_ctors()
    _reg_functions()
    _reg_post_hoc()
    _reg_fits()
    names = Counter((case.area, case.name) for case in CASES)
    duplicates = [key for key, count in names.items() if count > 1]
    assert not duplicates, f"case names must be unique: {duplicates}"


def report(results: list[Result], seconds: float, width: int) -> str:
    lines = []
    counts = Counter(result.cls for result in results)
    lines.append(f"{len(results)} cases in {seconds:.1f} s")
    lines.append("")
    lines.append("class           count")
    for cls in CLASSES:
        lines.append(f"{cls:<15} {counts.get(cls, 0):>5}")
    lines.append("")
    by_area: dict[str, Counter[str]] = defaultdict(Counter)
    for result in results:
        by_area[result.area][result.cls] += 1
    shown = [cls for cls in CLASSES if counts.get(cls)]
    header = f"{'area':<42}" + "".join(f"{cls:>15}" for cls in shown) + f"{'total':>8}"
    lines.append(header)
    for area in sorted(by_area):
        row = by_area[area]
        lines.append(f"{area:<42}" + "".join(f"{row.get(cls, 0):>15}" for cls in shown) + f"{sum(row.values()):>8}")
    lines.append("")
    lines.append("Every case that is not clear:")
    order = {cls: i for i, cls in enumerate(CLASSES)}
    for result in sorted((r for r in results if r.cls != "clear"), key=lambda r: (order[r.cls], r.area, r.name)):
        message = result.message if len(result.message) <= width else result.message[:width] + "..."
        line = f"[{result.cls}] {result.area} :: {result.name} -- {message}"
        if result.changes:
            changed = ", ".join(result.changes[:4]) + (f", ... ({len(result.changes)} in all)"
                                                      if len(result.changes) > 4 else "")  # fmt: skip
            line += f" || changed: {changed}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every case's outcome to this file")
    parser.add_argument("--only", help="run the cases whose 'area :: name' contains this text")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--width", type=int, default=180, help="truncate messages to this many characters")
    args = parser.parse_args(argv)
    global ROOT
    start = time.perf_counter()
    _load()
    register()
    cases = [case for case in CASES if not args.only or args.only in f"{case.area} :: {case.name}"]
    if args.list:
        for case in cases:
            print(f"{case.area} :: {case.name}  [{case.expect} {list(case.tokens)}]")
        print(f"{len(cases)} cases")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="emascale-sweep-") as root:
        ROOT = Path(root)
        for index, case in enumerate(cases):
            results.append(run_case(case, ROOT))
            if (index + 1) % 100 == 0:
                print(f"... {index + 1}/{len(cases)} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    seconds = time.perf_counter() - start
    print(report(results, seconds, args.width))
    if args.json:
        summary = Counter(result.cls for result in results)
        payload = {
            "seconds": round(seconds, 1),
            "counts": {cls: summary.get(cls, 0) for cls in CLASSES},
            "cases": [
                {
                    "area": r.area,
                    "name": r.name,
                    "class": r.cls,
                    "expect": r.expect,
                    "tokens": [list(t) if isinstance(t, tuple) else t for t in r.tokens],
                    "message": r.message,
                    "warnings": r.warnings,
                    "changes": r.changes,
                    "seconds": round(r.seconds, 3),
                }
                for r in results
            ],
        }
        Path(args.json).write_text(json.dumps(payload, indent=1, default=repr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
