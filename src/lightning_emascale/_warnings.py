"""Warnings that point at the user's line, not at this library's or torch's frames."""

from __future__ import annotations

import contextlib
import os
import sys
from types import FrameType
from typing import Optional

import torch


def caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package, contextlib and torch, for a warning issued by
    the function that calls this one (so that it points at the user's line). A dataclass's generated ``__init__``
    (file ``<string>``) is skipped too."""
    skipped = tuple(
        os.path.abspath(path)
        for path in (os.path.dirname(__file__), os.path.dirname(torch.__file__), contextlib.__file__)
    )
    frame: Optional[FrameType] = sys._getframe(2)  # the frame that called the warning's issuer
    level = 2
    while frame is not None and (
        frame.f_code.co_filename.startswith(skipped) or frame.f_code.co_filename == "<string>"
    ):
        frame, level = frame.f_back, level + 1
    return level
