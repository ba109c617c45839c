"""Step events: the `return_steps` streaming extension (docs/serving.md, "Step events").

A request that sets `"return_steps": true` (with `"stream": true`) gets, interleaved with
its normal chunks, chunks that carry no choices and one `blockdiff_step` object: what the
decoder just did to the request's current block (a denoising pass, a draft, a verification,
a commit). The engine thread hands raw per-row payloads over (decoding/batch.py's step events);
here, on the event loop, they become JSON with per-slot texts. Requests without the flag
never get an on_step callback, so their streams are unchanged, byte for byte.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

MAX_STEP_BACKLOG = 1024  # step events waiting for a slow reader before new ones are dropped


@dataclass
class Step:
    """One decoder event for one request, as queued from the engine thread."""
    kind: str  # "denoise", "draft", "verify" or "commit"
    payload: dict  # a fresh snapshot built by the decoder (lists of ints), never shared state


class StepBacklog:
    """Step events wait in the stream's queue next to its text updates. A reader slower than
    the engine must not make that queue grow without bound: past `limit` waiting events new
    ones are dropped and counted, and the next one delivered says how many were lost. Text
    updates are never dropped (they are the answer). Runs on the event loop only."""

    def __init__(self, queue: asyncio.Queue, limit: int = MAX_STEP_BACKLOG):
        self.queue, self.limit = queue, limit
        self.waiting = 0
        self.dropped = 0

    def offer(self, index: int, step: Step) -> None:
        if self.waiting >= self.limit:
            self.dropped += 1
            return
        if self.dropped:
            step = Step(step.kind, {**step.payload, "dropped_before": self.dropped})
            self.dropped = 0
        self.waiting += 1
        self.queue.put_nowait((index, step))

    def taken(self) -> None:
        self.waiting -= 1


class StepFormatter:
    """Turns one request's engine payloads into `blockdiff_step` objects."""

    def __init__(self, token_text: Callable[[int], str], mode: Callable[[], str]):
        self.token_text = token_text
        self.mode = mode  # read per event: the engine may resolve a mode at admission
        self.texts: dict[int, str] = {}  # token id -> text; a block repeats most ids per pass

    def _text(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        text = self.texts.get(token_id)
        if text is None:
            text = self.texts[token_id] = self.token_text(token_id)
        return text

    def step(self, index: int, event: Step) -> dict:
        p = event.payload
        out: dict = {"index": index, "kind": event.kind, "mode": self.mode()}
        extra: dict = {}
        if event.kind == "denoise":
            # slot 0 is the seed token, already committed; slots 1..end-1 are the block's output
            end, block, masked = p["end"], p["block"], p["masked"]
            ids = [None if masked[i] else block[i] for i in range(1, end)]
            out["step"] = p["step"]
        elif event.kind == "draft":
            ids = p["drafts"]
        elif event.kind == "verify":
            ids = p["drafts"]
            extra = {"accepted": p["accepted"], "drafted": p["drafted"], "bonus_id": p["bonus"],
                     "bonus_text": self._text(p["bonus"])}
        else:  # commit
            ids = p["tokens"]
        out.update(token_ids=ids, texts=[self._text(t) for t in ids], **extra,
                   nfe=p["nfe"], completion_tokens=p["completion_tokens"])
        if "dropped_before" in p:
            out["dropped_before"] = p["dropped_before"]
        return out


def step_chunk(head: dict, step: dict) -> dict:
    """A stream chunk with no choices (like the usage chunk), so text-gathering clients skip it."""
    return {**head, "choices": [], "blockdiff_step": step}
