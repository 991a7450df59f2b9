"""The command-line edge shared by every command: the typer app, one-line errors and warnings.

User errors (SpecontextError) and a missing optional dependency become one line on stderr and
exit 2, here and nowhere else. `--debug` (or SPECONTEXT_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import warnings
from typing import Annotated, Any, Callable

import typer
import typer.core
from rich.console import Console
from rich.table import Table
from rich.text import Text

from specontext_compiler.errors import SpecontextError

try:                        # typer >= 0.22 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:         # pragma: no cover - older typer runs on click itself
    from click import exceptions as click_exceptions


class _OneLineErrors(typer.core.TyperGroup):
    """typer's usage errors (a missing argument, --budget 0) as one stderr line, like every other
    error, instead of the multi-line box typer draws."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click_exceptions.NoArgsIsHelpError:
            sys.exit(2)                      # typer already printed the help
        except click_exceptions.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                Text("error: ", style="bold red") + Text(" ".join(exc.format_message().split()) + hint))
            sys.exit(exc.exit_code)
        except typer.Abort:
            Console(stderr=True).print("aborted")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=_OneLineErrors, help="SpeContext ahead-of-time compiler: plan KV residency for long-context decoding, "
                       "inspect plans, run them.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False)
STATE = {"debug": False}
# optional dependency (top-level module) -> what to pip install for it (an extra, or triton itself)
_EXTRAS = {"matplotlib": "specontext[plot]", "gguf": "specontext[gguf]", "accelerate": "specontext[gguf]",
           "fastapi": "specontext[serve]", "uvicorn": "specontext[serve]",
           "triton": "triton"}    # a dependency on Linux, where its wheels exist
PIPED_WIDTH = 1000      # columns when stdout is not a terminal: wider than any table we print


def out_console() -> Console:
    """stdout. Piped (no terminal, no COLUMNS), rich would assume 80 columns and cut table cells
    ("retriev…"); a file or another program gets every table at its full width instead."""
    piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    return Console(highlight=False, width=PIPED_WIDTH if piped else None)


def fail(message: str) -> None:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(Text("error: ", style="bold red") + Text(" ".join(message.split())))
    raise typer.Exit(code=2)


def edge(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors raised under a command into one stderr line and exit code 2."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SpecontextError as exc:
            if STATE["debug"]:
                raise
            fail(str(exc))
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if STATE["debug"] or top not in _EXTRAS:
                raise
            fail(f"{top} is not installed; install it with: pip install '{_EXTRAS[top]}'")
    return wrapper


def _print_version(value: bool) -> None:
    if value:
        from specontext_compiler import __version__
        sys.stdout.write(f"specontext {__version__}\n")
        raise typer.Exit()


@app.callback()
def _global(debug: Annotated[bool, typer.Option(
        "--debug", envvar="SPECONTEXT_DEBUG",
        help="Show the full traceback on errors (also SPECONTEXT_DEBUG=1).")] = False,
            version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print specontext's version and exit.")] = False) -> None:
    """SpeContext ahead-of-time compiler.

    Example: specontext compile llama-3.1-8b --target a100 --max-len 128k -o plans/llama
    """
    STATE["debug"] = debug


def strict_json(data: Any) -> str:
    """JSON other programs can parse: a NaN or infinity is an error, never written as `NaN`."""
    try:
        return json.dumps(data, indent=2, allow_nan=False)
    except ValueError:
        raise SpecontextError("the result holds a number that is not finite (NaN or infinity); "
                              "check the target's figures and the options, then recompile") from None


def key_value_table(rows: list[tuple[str, str]]) -> Table:
    """A borderless two-column summary: bold keys, their values."""
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


@contextlib.contextmanager
def one_line_warnings():
    """Show specontext's own warnings as one stderr line each ('warning: ...'); others as usual."""
    from specontext_compiler.errors import SpecontextWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpecontextWarning)
        yield
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for item in caught:
        if issubclass(item.category, SpecontextWarning):
            label = getattr(item.category, "label", "warning")      # a notice says "note:"
            err.print(Text(f"{label}: ", style="bold yellow") + Text(" ".join(str(item.message).split())))
        else:
            warnings.showwarning(item.message, item.category, item.filename, item.lineno)


def main() -> None:
    """Console-script entry point (`specontext`, `python -m specontext_compiler`)."""
    if not os.environ.get("SPECONTEXT_DEBUG"):        # a warning is one line too, like an error
        warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    app(prog_name="specontext")

