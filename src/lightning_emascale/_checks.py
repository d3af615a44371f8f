"""Every argument check of the library, in one place. Plain Python: no torch, no Lightning.

Numbers are numbers: a numpy scalar or a 0-d tensor is accepted wherever a float or an int is (``numbers.Real``,
``operator.index``), a bool never is. Each check returns the value as a plain ``float``/``int`` and raises with
the argument's name, the bad value and what is allowed. An integer too large for a float (``10**400``) is an
infinite real number to every check here, refused by name like any other out-of-range value, and a count (a batch
size, samples, steps) stops at :data:`MAX_COUNT`.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Optional

#: The largest count (samples, a batch size, steps, epochs) the library takes: 2**53 = 9007199254740992, where
#: floats stop holding every integer. Every count up to it converts to a float exactly, so kappa (samples / base
#: batch size) and progress (samples seen / total samples) come from the exact counts, and kappa never rounds to 0
#: (1 / 2**53 is a normal float). At a million samples a second a run takes 285 years to reach it.
MAX_COUNT = 2**53
#: How errors name :data:`MAX_COUNT`.
MAX_COUNT_TEXT = f"MAX_COUNT = 2**53 = {MAX_COUNT} (floats hold every integer up to it exactly)"

#: Integers of more digits than this are shown by their leading digits and size (Python refuses to print one of
#: more than 4300 digits).
_SHOWN_DIGITS = 30


def _unwrap(value: Any) -> Any:
    """A 0-d array or tensor as its Python scalar; anything else as it is."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def show(value: Any) -> str:
    """``repr(value)`` for an error message; an integer of more than 30 digits as its leading digits and size.

    Example:
        >>> show(0.5), show(2**53), show(-(10**400))
        ('0.5', '9007199254740992', '-1e+400 (an integer of 401 digits)')
    """
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**_SHOWN_DIGITS:
        size = abs(value)
        digits = int(math.log10(size)) + 1  # may be one off: log10 of a huge integer is rounded
        digits += (size >= 10**digits) - (size < 10 ** (digits - 1))
        leading = size // 10 ** (digits - 6)  # the first six digits, exactly
        return f"{'-' if value < 0 else ''}{leading / 10**5:.6g}e+{digits - 1} (an integer of {digits} digits)"
    try:
        return repr(value)
    except ValueError:  # a Fraction of integers past Python's 4300-digit limit
        return f"a {type(value).__name__} too large to print"


def _got(value: Any, number: float) -> str:
    """A checked number in a message: the float it became, or ``value`` itself where it was too large for one."""
    if math.isinf(number) and isinstance(_unwrap(value), numbers.Rational):  # an integer or fraction: finite
        return f"{show(value)}, too large for a float"
    return str(number)


def as_real(value: Any) -> Optional[float]:
    """``value`` as a float if it is a real number (not a bool), else ``None``.

    A number beyond the float range (``10**400``) is ``inf`` (``-inf``), so a check refuses it as not finite.
    """
    value = _unwrap(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        positive: bool = value > 0  # type: ignore[operator]  # numbers.Real declares no comparison
        return math.inf if positive else -math.inf


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
        raise TypeError(f"`{name}` must be a real number in {interval}, got {show(value)}")
    if not (0.0 <= number < 1.0 or (allow_one and number == 1.0)):
        raise ValueError(f"`{name}` must be in {interval}, got {_got(value, number)}")
    return number


def check_positive(value: Any, name: str) -> float:
    """A positive finite real number."""
    number = as_real(value)
    if number is None:
        raise TypeError(f"`{name}` must be a positive real number, got {show(value)}")
    if not (number > 0.0 and math.isfinite(number)):
        raise ValueError(f"`{name}` must be a positive finite number, got {_got(value, number)}")
    return number


def check_finite(value: Any, name: str) -> float:
    """A finite real number."""
    number = as_real(value)
    if number is None:
        raise TypeError(f"`{name}` must be a finite real number, got {show(value)}")
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number, got {_got(value, number)}")
    return number


def check_non_negative(value: Any, name: str) -> float:
    """A finite real number >= 0."""
    number = as_real(value)
    if number is None:
        raise TypeError(f"`{name}` must be a finite real number >= 0, got {show(value)}")
    if not (number >= 0.0 and math.isfinite(number)):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {_got(value, number)}")
    return number


def check_fraction(value: Any, name: str) -> float:
    """A real number in [0, 1]."""
    number = as_real(value)
    if number is None or not 0.0 <= number <= 1.0:
        shown = show(value) if number is None else _got(value, number)
        raise ValueError(f"`{name}` must be a number in [0, 1], got {shown}")
    return number


def check_progress(value: Any) -> float:
    """Training progress, samples seen / total samples, in [0, 1]."""
    number = as_real(value)
    if number is None:
        raise TypeError(f"`progress` must be a real number in [0, 1], got {show(value)}")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"`progress` must be in [0, 1] (samples seen / total samples), got {_got(value, number)}")
    return number


def check_count(value: Any, name: str, minimum: int = 0, allow_none: bool = False, what: str = "") -> Any:
    """An integer in [``minimum``, :data:`MAX_COUNT`] (or ``None`` with ``allow_none``), as a plain ``int``.

    ``what`` (e.g. " (the micro-batch's global size)") follows the allowed values in the message.

    Example:
        >>> check_count(2**53, "samples_seen")
        9007199254740992
        >>> check_count(10**400, "base_batch_size", minimum=1)
        Traceback (most recent call last):
        ...
        ValueError: `base_batch_size` must be a positive integer up to MAX_COUNT = 2**53 = 9007199254740992 (floats \
hold every integer up to it exactly), got 1e+400 (an integer of 401 digits)
    """
    if value is None and allow_none:
        return None
    allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    number = as_int(value)
    if number is None or number < minimum:
        raise ValueError(f"`{name}` must be {allowed}{' or None' if allow_none else ''}{what}, got {show(value)}")
    if number > MAX_COUNT:
        raise ValueError(f"`{name}` must be {allowed} up to {MAX_COUNT_TEXT}{what}, got {show(value)}")
    return number


def check_positive_int(value: Any, name: str, allow_none: bool = False, what: str = "") -> Any:
    """An integer in [1, :data:`MAX_COUNT`] (or ``None`` with ``allow_none``)."""
    return check_count(value, name, minimum=1, allow_none=allow_none, what=what)


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {show(value)}")
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
        raise ValueError(f"`{name}` must be one of {sorted(choices)}, got {show(value)}")
    return value


def check_name(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"`{name}` must be a non-empty string, got {show(value)}")
    return value


def check_paths(value: Any, name: str, item: Callable[[Any], Any], kind: str) -> Optional[dict[str, Any]]:
    """A non-empty dict of attribute path -> ``item(value)``, copied; ``None`` stays ``None``.

    ``item`` returns the checked value or ``None`` when it is not a ``kind``.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"`{name}` must be a non-empty dict of attribute paths, got {show(value)}")
    checked: dict[str, Any] = {}
    for path, entry in value.items():
        converted = item(entry)
        if not isinstance(path, str) or not path or converted is None:
            raise ValueError(f"`{name}` must map attribute paths (strings) to {kind}, got {path!r}: {show(entry)}")
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
            f"`{name}` must be a list of parameter, buffer or submodule names, got {show(value)}"
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


def check_directory(value: Any, name: str) -> str:
    """A path a directory can be made at (it is one already, or its nearest existing parent is one), as a str: no
    NUL byte, no existing file at it or above it. Nothing is created."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"`{name}` must be a directory path (a str or os.PathLike), got {show(value)}")
    path = os.fspath(value)
    if isinstance(path, bytes):
        raise ValueError(f"`{name}` must be a str or os.PathLike path, got bytes {path!r}")
    if "\x00" in path:
        raise ValueError(f"`{name}`={path!r} holds a NUL byte, which no file system allows in a path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{name}`={path!r} is an existing file, not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"`{name}`={path!r} lies below {parent!r}, an existing file: no directory can be made there")
    return path
