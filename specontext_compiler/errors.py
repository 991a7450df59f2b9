"""User-facing errors: one exception family, caught once at the CLI edge (exit 2, one line).

Library code raises these for bad input; asserts are kept for internal invariants only.
The runtime imports this module too, so it depends on nothing but the standard library.
"""


class SpecontextError(Exception):
    """A problem with what the user asked for; the message names the problem and the fix."""


class ModelError(SpecontextError):
    """Unknown model or preset, unreadable config, unsupported architecture."""


class TargetError(SpecontextError):
    """Unknown target or malformed target TOML."""


class InfeasiblePlanError(SpecontextError):
    """No residency plan fits the target; the message names the smallest change that would."""


class PlanError(SpecontextError):
    """A plan directory that is missing, corrupted or written by a newer specontext."""


class ModelMismatchError(SpecontextError):
    """A plan bound to a model it was not compiled for."""


class RuntimeResourceError(SpecontextError):
    """Out of GPU or pinned host memory, or a request longer than the plan allows."""


class RequestError(SpecontextError, ValueError):
    """A request or bind() option the engine cannot serve as given (empty, too long, bad token ids or
    sampling parameters)."""


class SpecontextWarning(UserWarning):
    """Something works but not as well as it could; the message names the fix (CLI: one stderr line)."""
