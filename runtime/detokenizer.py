"""Text of a request as its tokens arrive: incremental decoding, stop strings, safe deltas.

Decoding every token alone breaks multi-byte characters and the leading spaces some tokenizers
attach to word pieces; decoding the whole sequence each time is quadratic in its length. So each
new token decodes a short window (from a few tokens back) and keeps the part past what that
window's prefix already gave; a window ending in U+FFFD waits for the bytes that complete it.
A delta never includes text that could still turn out to start a stop string.
"""
from __future__ import annotations

_INCOMPLETE = "\ufffd"


class TextStream:
    """One request's generated text; add() each token, then take delta() to stream."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False       # a stop string was found: text ends right before it
        self._prefix_offset = 0    # the window starts here
        self._read_offset = 0      # tokens before this are already in text
        self._emitted = 0          # characters of text handed out by delta()
        self._searched = 0         # stop strings were looked for in text[:_searched]

    def add(self, token_id: int) -> bool:
        """Append one token; returns True once a stop string ended the text."""
        if self.stopped:
            return True
        self.ids.append(int(token_id))
        self._extend(final=False)
        return self._find_stop()

    def finish(self) -> None:
        """No more tokens: take the window's text even if it ends in an incomplete character."""
        if not self.stopped:
            self._extend(final=True)
            self._find_stop()

    def delta(self, final: bool = False) -> str:
        """Text not handed out yet, holding back a tail that may start a stop string (unless final)."""
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._held_back()
        out = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return out

    def _extend(self, final: bool) -> None:
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        window = decode(self.ids[self._prefix_offset:], skip_special_tokens=True)
        if len(window) > len(before) and (final or not window.endswith(_INCOMPLETE)):
            self.text += window[len(before):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)

    def _find_stop(self) -> bool:
        if not self.stop:
            return False
        longest = max(len(s) for s in self.stop)
        start = max(0, self._searched - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        self._searched = len(self.text)
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def _held_back(self) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best
