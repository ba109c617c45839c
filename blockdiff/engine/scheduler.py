"""The serving engine: one thread owns the model and runs continuous batching.

Each iteration admits waiting requests (up to max_running), prefills the newcomers of each
(mode, block_length) group as a batch of their own and merges them into that group's
running DecodeBatch, then runs one decode step of every group, round-robin. Groups in
different modes share the iteration, not a forward. Every row keeps its own cache length,
generator and draft state, so a sequence's tokens do not depend on who shares its batch:
at temperature 0 the results equal unbatched `LLM.generate`.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from blockdiff.decoding.batch import DecodeBatch
from blockdiff.decoding.run import DECODERS
from blockdiff.engine.auto import AutoMode
from blockdiff.engine.infill import InfillJob
from blockdiff.engine.request import Request, Update
from blockdiff.engine.steps import StepRouter

log = logging.getLogger("blockdiff.engine")
Observer = Callable[[Request, Update], None]


class QueueFull(RuntimeError):
    """More requests are waiting than --max-queue allows."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or has died."""


@dataclass
class EngineConfig:
    max_running_requests: int = 32  # sequences decoded together, across all groups
    max_queue: int = 256  # requests allowed to wait for a slot; more are refused


@dataclass
class Group:
    batch: DecodeBatch | InfillJob
    step: Callable
    requests: list[Request] = field(default_factory=list)


class Engine:
    def __init__(self, model, mask_token_id: int | None, config: EngineConfig | None = None,
                 observer: Observer | None = None, auto: AutoMode | None = None):
        self.model = model
        self.auto = auto or AutoMode()
        self.mask_token_id = mask_token_id
        self.config = config or EngineConfig()
        self.observer = observer
        self.waiting: deque[Request] = deque()
        self.groups: dict[tuple, Group] = {}
        self.steps = StepRouter()  # step events to the requests that asked (return_steps)
        self.cond = threading.Condition()
        self.stopping = False
        self.error: str | None = None  # set if the loop itself died
        self.iterations = 0
        self.thread: threading.Thread | None = None

    # --- called from any thread ------------------------------------------------------------
    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._loop, name="blockdiff-engine", daemon=True)
        self.thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and not self.stopping

    def submit(self, request: Request) -> None:
        with self.cond:
            if not self.alive:
                raise EngineStopped(self.error or "the engine is not running")
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue "
                                f"{self.config.max_queue}); retry later")
            self.waiting.append(request)
            self.cond.notify()

    def abort(self, request: Request) -> None:
        """Free the request's slot at the next step (a client went away)."""
        request.aborted = True
        with self.cond:
            self.cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step; unfinished requests end with an error update."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(len(g.requests) for g in list(self.groups.values()))

    # --- the engine thread -----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self.cond:
                        while not self.stopping and not self.waiting and not self.groups:
                            self.cond.wait()
                        if self.stopping:
                            break
                        newcomers = self._take_newcomers()
                    self._admit(newcomers)
                    self._step_all()
                    self.iterations += 1
        except BaseException as e:  # a bug, not bad input: keep the message for /health
            self.error = f"engine loop died: {e!r}"
            log.error("%s\n%s", self.error, traceback.format_exc())
        finally:
            self.stopping = True
            self._fail_all("the server is shutting down" if self.error is None else self.error)

    def _take_newcomers(self) -> list[Request]:
        room = self.config.max_running_requests - self.num_running
        taken = []
        while self.waiting and len(taken) < room:
            request = self.waiting.popleft()
            if request.aborted:
                request.seq.finish_reason = "abort"
                self._report(request)
                continue
            request.scheduled = time.perf_counter()
            taken.append(request)
        return taken

    def _admit(self, newcomers: list[Request]) -> None:
        load = self.num_running + len(newcomers)  # sequences decoded alongside, across groups
        by_group: dict[tuple, list[Request]] = {}
        for request in newcomers:
            if request.seq.params.mode == "auto":
                request.seq.params = dataclasses.replace(request.seq.params, mode=self.auto.choose(load))
            by_group.setdefault(request.group, []).append(request)
        for key, requests in by_group.items():
            try:
                group = self._start_group(requests)
            except Exception as e:  # e.g. out of memory: fail these requests, keep serving
                log.error("prefill failed: %r\n%s", e, traceback.format_exc())
                for request in requests:
                    self._report(request, error=f"prefill failed: {e}")
                continue
            self._settle(group)
            if not group.requests:
                continue
            running = self.groups.get(key)
            if running is None:
                self.groups[key] = group
            else:  # a live group: its batch has at least one row
                running.batch.merge(group.batch)
                running.requests.extend(group.requests)

    def _start_group(self, requests: list[Request]) -> Group:
        seqs = [r.seq for r in requests]
        if requests[0].suffix_ids is not None:
            job = InfillJob(self.model, seqs[0], requests[0].suffix_ids, self.mask_token_id)
            job.start()
            return Group(job, InfillJob.step, requests)
        decoder = DECODERS[seqs[0].params.mode]
        self.steps.add(requests)
        batch = DecodeBatch(self.model, seqs, self.mask_token_id, decoder.extra_slots(seqs[0].params.block_length),
                            self.steps)
        decoder.start(batch)
        return Group(batch, decoder.step, requests)

    def _step_all(self) -> None:
        for key in list(self.groups):
            group = self.groups[key]
            for request in group.requests:
                if request.aborted:
                    group.batch.abort(request.seq)
            self._settle(group)
            if group.requests:
                # load as `_admit` sees it when choosing for mode="auto": every running sequence
                load, started = self.num_running, time.perf_counter()
                emitted = sum(len(r.seq.output_ids) for r in group.requests)
                try:
                    group.step(group.batch)
                    emitted = sum(len(r.seq.output_ids) for r in group.requests) - emitted
                    self.auto.record(key[0], load, max(emitted, 0), time.perf_counter() - started)
                except Exception as e:
                    log.error("decode step failed: %r\n%s", e, traceback.format_exc())
                    for request in group.requests:
                        self._report(request, error=f"decode step failed: {e}")
                    group.requests = []
                self._settle(group)
            if not group.requests:
                del self.groups[key]

    def _settle(self, group: Group) -> None:
        """Report progress, then drop finished rows from the batch and the group."""
        for request in group.requests:
            self._report(request)
        group.batch.retire()
        group.requests = [r for r in group.requests if not r.done]

    def _report(self, request: Request, error: str | None = None) -> None:
        try:
            update = request.report(error)
            if update is not None and self.observer is not None:
                self.observer(request, update)
        except Exception:  # a caller's callback must never take the engine down
            log.error("update callback failed\n%s", traceback.format_exc())
            update = None
        if request.done:
            self.steps.forget(request)
        if update is not None:
            request.last_commit = time.perf_counter()

    def _fail_all(self, message: str) -> None:
        with self.cond:
            pending = list(self.waiting)
            self.waiting.clear()
        for group in list(self.groups.values()):
            pending.extend(group.requests)
        self.groups.clear()
        for request in pending:
            self._report(request, error=message)
