"""Warnings from deep inside bind name the line of the caller's code that bound the plan.

A fixed stacklevel points at one of our own frames whenever the call chain differs (plan.bind,
Engine.from_plan, the CLI); counting the runtime's frames names the caller's line instead.
"""
from __future__ import annotations

import os
import sys

_RUNTIME_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def caller_stacklevel() -> int:
    """The `stacklevel` for warnings.warn, called right there, of the first frame outside runtime/."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_RUNTIME_DIR):
        frame, level = frame.f_back, level + 1
    return level
