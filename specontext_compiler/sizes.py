"""Parse the sizes people type: token counts (131072, 128k, 1M) and batch sizes (4, auto)."""
import re

from specontext_compiler.errors import SpecontextError

_SUFFIX = {"k": 1024, "m": 1024 * 1024}


def parse_tokens(text: str | int, what: str = "--max-len") -> int:
    """Return a positive token count from '131072', '128k' or '1M' (k = 1024)."""
    if isinstance(text, int):
        value = text
    else:
        raw = str(text).strip().lower()
        scale = _SUFFIX.get(raw[-1:], 1)
        digits = raw[:-1] if raw[-1:] in _SUFFIX else raw
        try:
            value = int(float(digits) * scale) if digits else -1
        except (ValueError, OverflowError):     # 'abc', 'nan', 'inf', '1e400'
            value = -1
        if digits and "." in digits and scale == 1:
            value = -1
    if value <= 0:
        raise SpecontextError(
            f"{what} {text!r} is not a token count; write it as 131072, 128k or 1M")
    return value


def parse_batch(value: int | str) -> int | str:
    """A positive request count (an int or its digits) or "auto" (the largest batch that fits)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[1-9][0-9]*\s*", value):
        return int(value)
    raise SpecontextError(f"--batch {value!r} is not a request count; write a positive integer or 'auto'")
