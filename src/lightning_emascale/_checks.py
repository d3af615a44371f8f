"""Every argument check of the library, in one place. Plain Python: no torch, no Lightning.

Numbers are numbers: a numpy scalar or a 0-d tensor is accepted wherever a float or an int is (``numbers.Real``,
``operator.index``), a bool never is. Each check returns the value as a plain ``float``/``int`` and raises with
the argument's name, the bad value and what is allowed.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Optional


def _unwrap(value: Any) -> Any:
    """A 0-d array or tensor as its Python scalar; anything else as it is."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def as_real(value: Any) -> Optional[float]:
    """``value`` as a float if it is a real number (not a bool), else ``None``."""
    value = _unwrap(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def as_int(value: Any) -> Optional[int]:
    """``value`` as an int if it is an integer (``operator.index``, not a bool), else ``None``."""
    value = _unwrap(value)
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_momentum(value: Any, name: str = "momentum", allow_one: bool = False) -> float:
    """A momentum in [0, 1), or [0, 1] with ``allow_one`` (a frozen EMA, where BYOL's cosine ends)."""
    interval = "[0, 1]" if allow_one else "[0, 1)"
    number = as_real(value)
    if number is None:
        raise TypeError(f"`{name}` must be a real number in {interval}, got {value!r}")
    if not (0.0 <= number < 1.0 or (allow_one and number == 1.0)):
        raise ValueError(f"`{name}` must be in {interval}, got {number}")
    return number


def check_positive(value: Any, name: str) -> float:
    """A positive finite real number."""
    number = as_real(value)
    if number is None:
        raise TypeError(f"`{name}` must be a positive real number, got {value!r}")
    if not (number > 0.0 and math.isfinite(number)):
        raise ValueError(f"`{name}` must be a positive finite number, got {number}")
    return number


def check_finite(value: Any, name: str) -> float:
    """A finite real number."""
    number = as_real(value)
    if number is None:
        raise TypeError(f"`{name}` must be a finite real number, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number, got {number}")
    return number


def check_non_negative(value: Any, name: str) -> float:
    """A finite real number >= 0."""
    number = as_real(value)
    if number is None or not (number >= 0.0 and math.isfinite(number)):
        raise ValueError(f"`{name}` must be a number >= 0, got {value!r}")
    return number


def check_fraction(value: Any, name: str) -> float:
    """A real number in [0, 1]."""
    number = as_real(value)
    if number is None or not 0.0 <= number <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}")
    return number


def check_progress(value: Any) -> float:
    """Training progress, samples seen / total samples, in [0, 1]."""
    number = as_real(value)
    if number is None:
        raise TypeError(f"`progress` must be a real number in [0, 1], got {value!r}")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"`progress` must be in [0, 1] (samples seen / total samples), got {number}")
    return number


def check_positive_int(value: Any, name: str, allow_none: bool = False) -> Any:
    """An integer >= 1 (or ``None`` with ``allow_none``)."""
    if value is None and allow_none:
        return None
    number = as_int(value)
    if number is None or number < 1:
        allowed = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return number


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_evaluate_with_ema(value: Any, teacher_mode: bool) -> bool:
    """``evaluate_with_ema``: ``None`` means True for a Polyak EMA, False in teacher mode (which cannot swap)."""
    if teacher_mode and value:
        raise ValueError(
            "`evaluate_with_ema=True` needs a separate EMA copy to swap in, and teacher mode (`teachers`) keeps"
            " none: evaluate the teacher submodules directly, or add a second EMAScalingCallback without"
            " `teachers` for a Polyak EMA of the student"
        )
    return check_bool(not teacher_mode if value is None else value, "evaluate_with_ema")


def check_choice(value: Any, name: str, choices: Collection[str]) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}, got {value!r}")
    return value


def check_name(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"`{name}` must be a non-empty string, got {value!r}")
    return value


def check_paths(value: Any, name: str, item: Callable[[Any], Any], kind: str) -> Optional[dict[str, Any]]:
    """A non-empty dict of attribute path -> ``item(value)``, copied; ``None`` stays ``None``.

    ``item`` returns the checked value or ``None`` when it is not a ``kind``.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"`{name}` must be a non-empty dict of attribute paths, got {value!r}")
    checked: dict[str, Any] = {}
    for path, entry in value.items():
        converted = item(entry)
        if not isinstance(path, str) or not path or converted is None:
            raise ValueError(f"`{name}` must map attribute paths (strings) to {kind}, got {path!r}: {entry!r}")
        checked[path] = converted
    return checked


def as_str(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def check_names(value: Any, name: str) -> Optional[tuple[str, ...]]:
    """A sequence of distinct non-empty strings (tensor names or submodule paths), as a tuple; ``None`` stays."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(
            f"`{name}` must be a list of parameter, buffer or submodule names, got {value!r}"
            + (f" (write [{value!r}] for one name)" if isinstance(value, str) else "")
        )
    bad = [entry for entry in value if not isinstance(entry, str) or not entry]
    if bad:
        raise ValueError(f"`{name}` must hold non-empty strings (names), got {bad[0]!r} in {list(value)!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"`{name}` lists a name twice: {list(value)!r}")
    return tuple(value)


def check_saved_state(state: Any, where: str, version: int, keys: Collection[str], hint: str = "") -> None:
    """Raise unless ``state`` is a dict of format ``version`` holding every key of ``keys``.

    ``where`` starts every message (e.g. "The saved ScaledEMA state"); ``hint`` follows "must be a dict".
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{where} must be a dict{hint}, got {type(state).__name__}")
    if state.get("format") != version:
        raise ValueError(
            f"{where} has format {state.get('format')!r}; this version of lightning-emascale reads format {version}"
        )
    missing = [key for key in keys if key not in state]
    if missing:
        raise KeyError(f"{where} lacks {missing}")
