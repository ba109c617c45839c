"""One request as the scheduler sees it: its Sequence, how to tell the caller about progress,
and the timestamps the server's latency metrics are made of (arrival is the Sequence's)."""
from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blockdiff.decoding.batch import EventHook
from blockdiff.decoding.logprobs import TokenLogprob
from blockdiff.decoding.metrics import Metrics
from blockdiff.decoding.sequence import Sequence

_ids = itertools.count()


@dataclass
class Update:
    """A snapshot handed from the engine thread to the caller; never shared mutable state."""
    token_ids: list[int]  # every token emitted so far (a stop string may have cut earlier ones)
    new_tokens: int  # how many tokens this step committed for the request
    finish_reason: str | None  # None while running; "stop", "length", "abort" or "error"
    stop_text_end: int | None = None
    metrics: Metrics | None = None  # a copy, once finished
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when the request asked
    prompt_logprobs: list[TokenLogprob | None] | None = None
    time: float = field(default_factory=time.perf_counter)  # when the scheduler made it
    since_previous: float | None = None  # seconds since the request's previous update; None for its first


@dataclass
class Request:
    seq: Sequence
    on_update: Callable[[Update], None] | None = None  # the server's delivery (server/engine.py)
    # return_steps: on_step(kind, payload) gets this request's decoder events (see
    # the step events in decoding/batch.py), on the engine thread; must not block
    on_step: EventHook | None = None
    id: int = field(default_factory=lambda: next(_ids))
    scheduled: float | None = None  # when the scheduler admitted it (queue time ends)
    last_update: float | None = None
    sent: int = 0  # tokens already reported
    aborted: bool = False  # set from any thread; the scheduler acts on it before its next step
    done: bool = False
    exception: Exception | None = None  # what ended it with an error update

    @property
    def arrival(self) -> float:
        return self.seq.arrival

    @property
    def mode(self) -> str:
        """The label responses and metrics report: the decoding mode ("auto" resolved once the
        request is scheduled), or "infill" for fill-in-the-middle."""
        return "infill" if self.seq.suffix_ids is not None else self.seq.params.mode

    @property
    def group(self) -> tuple:
        """Requests in one group share a DecodeBatch; infilling runs alone."""
        if self.seq.suffix_ids is not None:
            return (self.mode, self.id)
        return (self.mode, self.seq.params.block_length)

    def report(self, error: str | None = None) -> Update | None:
        """What changed since the last report, as an Update; None when nothing did."""
        if self.done:
            return None
        seq = self.seq
        new = len(seq.output_ids) - self.sent
        reason = "error" if error else seq.finish_reason
        if new <= 0 and reason is None:
            return None
        self.sent = len(seq.output_ids)
        self.done = reason is not None
        metrics = copy.deepcopy(seq.metrics) if self.done else None
        logprobs = list(seq.logprobs) if seq.params.logprobs is not None else None  # records are frozen
        update = Update(list(seq.output_ids), max(new, 0), reason, seq.stop_text_end, metrics, error,
                        logprobs, seq.prompt_logprobs)
        if self.last_update is not None:
            update.since_previous = update.time - self.last_update
        self.last_update = update.time
        return update
