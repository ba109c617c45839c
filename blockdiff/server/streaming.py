"""From engine snapshots to the text a client may see, and Server-Sent Events.

Only committed tokens reach the tracker (drafts and MASKs never leave the engine). Two
things are still held back until later tokens settle them:
- a trailing U+FFFD: a character whose bytes are split across tokens;
- the longest tail that is the start of some stop string: if the stop string completes,
  Sequence cuts the text at its start, and nothing at or past it may have been sent.
So a stream never carries text past a stop string, even when a block overshoots it.

Each snapshot is detokenized whole: simple and exact, O(n) per update (n = output tokens),
fine for the output lengths served here.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable

from blockdiff.engine.request import Update

log = logging.getLogger("blockdiff.server")


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class TextTracker:
    def __init__(self, detokenize: Callable[[list[int]], str], stops: list[str]):
        self.detokenize = detokenize
        self.stops = stops
        self.sent = ""

    def final_text(self, update: Update) -> str:
        text = self.detokenize(update.token_ids)
        return text[:update.stop_text_end] if update.stop_text_end is not None else text

    def advance(self, update: Update) -> str:
        """The new text this update lets the client see (possibly empty)."""
        if update.finish_reason is not None:
            safe = self.final_text(update)
        else:
            text = self.detokenize(update.token_ids)
            text = text.rstrip("\ufffd")
            safe = text[:len(text) - held_back(text, self.stops)]
        if len(safe) <= len(self.sent):
            return ""
        if not safe.startswith(self.sent):  # would mean earlier text changed; never resend it
            log.warning("streamed text diverged from the final text; dropping the difference")
            return ""
        delta = safe[len(self.sent):]
        self.sent = safe
        return delta


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")
