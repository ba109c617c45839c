"""Routing the decoders' step events to the requests that asked for them (`return_steps`).

Many requests share one DecodeBatch, and rows move when sequences retire or batches merge,
so an event names its row as of the moment it is emitted; the router resolves that row to
its Sequence right away (batch.seqs[row]) and from there to the request. Rows whose request
did not ask are not observed at all: the decoders build no payload for them.
"""
from __future__ import annotations

import logging
import traceback

from blockdiff.decoding.batch import DecodeBatch
from blockdiff.engine.request import Request

log = logging.getLogger("blockdiff.engine")


class StepRouter:
    """Owned by the engine thread: every method runs there, so no lock is needed."""

    def __init__(self):
        self.listeners: dict[int, Request] = {}  # id(request.seq) -> request, while it runs

    def attach(self, batch: DecodeBatch, requests: list[Request]) -> None:
        """Register the requests that want steps and route `batch`'s events to them. Later
        merges need nothing: a merged batch's router resolves rows through its own seqs."""
        for request in requests:
            if request.on_step is not None:
                self.listeners[id(request.seq)] = request
        listeners = self.listeners
        batch.listening = lambda seq: id(seq) in listeners

        def deliver(kind: str, payload: dict) -> None:
            request = listeners.get(id(batch.seqs[payload["row"]]))
            if request is None or request.done:
                return
            try:
                request.on_step(kind, payload)
            except Exception:  # a caller's callback must never take the engine down
                log.error("step callback failed\n%s", traceback.format_exc())

        batch.on_event = deliver

    def forget(self, request: Request) -> None:
        """A finished request hears no more (and its Sequence's id may be reused)."""
        self.listeners.pop(id(request.seq), None)
