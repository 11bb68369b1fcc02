"""Token ids to text as they arrive: incremental detokenisation and OpenAI ``stop`` strings.

Decoding the whole completion each time and emitting the new suffix keeps multi-token
characters and word-joining tokenisers right; text ending in U+FFFD (half a UTF-8 character)
and any tail that could still become a stop string are held back until the next token.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TextStream"]


class TextStream:
    """Feed token ids with :meth:`push`; it returns the text that is final so far."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """New final text after ``token``; sets ``stopped`` when a stop string appeared."""
        self.ids.append(token)
        text = self._text()
        cut = min((i for i in (text.find(s, max(0, len(self.sent) - len(s) + 1)) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            return self._advance(text[:cut])
        if text.endswith("\ufffd"):
            return ""
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._advance(text[:len(text) - hold])

    def finish(self) -> str:
        """Whatever was held back, once no more tokens come (and no stop string matched)."""
        return "" if self.stopped else self._advance(self._text())

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new
