"""The `specontext` command line: compile, inspect, targets, run, serve, eval, distill, heads.

Each command parses its options, calls one library function and renders the result (app.py has
the shared edge: errors and warnings as one line, exit 2). Commands register on import, in the
order `specontext --help` lists them.
"""
from specontext_compiler.cli import compile_command, plan_commands, serving_commands, distill_command  # noqa: F401
from specontext_compiler.cli.app import app, main

__all__ = ["app", "main"]
