"""Parse token counts written the way people write them: 131072, 128k, 1M."""
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
