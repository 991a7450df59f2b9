"""The active step context: what the specontext:: ops read and write while a graph runs.

A StepContext (runtime/step_context.py) is installed for the duration of a forward with
`with context.active(step):`; ops look it up with current(). Outside that block there is no
context and ops raise, naming the cause.
"""
from __future__ import annotations

import contextlib
import threading

_local = threading.local()


def current():
    step = getattr(_local, "step", None)
    if step is None:
        raise RuntimeError("a specontext:: op ran outside an engine step; run the graph through "
                           "specontext_compiler.runtime (Engine) or install a StepContext with context.active()")
    return step


@contextlib.contextmanager
def active(step):
    previous = getattr(_local, "step", None)
    _local.step = step
    try:
        yield step
    finally:
        _local.step = previous
