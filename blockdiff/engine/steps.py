"""Routing the decoders' step events to the requests that asked for them (`return_steps`).

Many requests share one DecodeBatch, and rows move when sequences retire or batches merge;
the batch hands the router each event's Sequence, and the router finds its request by it.
Rows whose request did not ask are not observed at all: the decoders build no payload for them.
"""
from __future__ import annotations

import logging
import traceback

from blockdiff.decoding.sequence import Sequence
from blockdiff.engine.request import Request

log = logging.getLogger("blockdiff.engine")


class StepRouter:
    """The server's StepObserver, shared by every batch it decodes. Owned by the engine thread:
    every method runs there, so no lock is needed."""

    def __init__(self):
        self.listeners: dict[int, Request] = {}  # id(request.seq) -> request, while it runs

    def add(self, requests: list[Request]) -> None:
        """Route the steps of those requests that asked for them (merges need nothing more)."""
        for request in requests:
            if request.on_step is not None:
                self.listeners[id(request.seq)] = request

    def wants(self, seq: Sequence) -> bool:
        return id(seq) in self.listeners

    def event(self, kind: str, seq: Sequence, payload: dict) -> None:
        request = self.listeners.get(id(seq))
        if request is None or request.done:
            return
        try:
            request.on_step(kind, payload)
        except Exception:  # a caller's callback must never take the engine down
            log.error("step callback failed\n%s", traceback.format_exc())

    def forget(self, request: Request) -> None:
        """A finished request hears no more (and its Sequence's id may be reused)."""
        self.listeners.pop(id(request.seq), None)
