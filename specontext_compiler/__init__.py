"""specontext: an ahead-of-time compiler and runtime for SpeContext sparse long-context decoding.

Exports are lazy (PEP 562) so that `import specontext_compiler.runtime` on a serving machine
pulls in neither PuLP nor typer/rich nor the compiler passes.
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "compile": ("specontext_compiler.driver", "compile_model"),
    "compile_model": ("specontext_compiler.driver", "compile_model"),
    "load_plan": ("specontext_compiler.runtime.plan", "load_plan"),
    "Plan": ("specontext_compiler.runtime.plan", "Plan"),
    "SpecontextError": ("specontext_compiler.errors", "SpecontextError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        return getattr(import_module(module_name), attr)
    raise AttributeError(f"module 'specontext_compiler' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
