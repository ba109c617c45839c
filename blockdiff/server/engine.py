"""The server's engine thread: it owns a Scheduler (engine/scheduler.py) and steps it while
requests wait or run, delivering each update to its request's `on_update` and the metrics.

HTTP handlers run on the event loop: they `submit` requests into an inbox (bounded by
max_queue) and set `aborted` on those whose client left; the thread moves the inbox into the
scheduler before each step, so only the thread ever touches the scheduler.
"""
from __future__ import annotations

import logging
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from blockdiff.engine.request import Request, Update
from blockdiff.engine.scheduler import Progress, Scheduler

log = logging.getLogger("blockdiff.engine")
Observer = Callable[[Request, Update], None]


class QueueFull(RuntimeError):
    """More requests are waiting than --max-queue allows."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or has died."""


@dataclass
class EngineConfig:
    max_queue: int = 256  # requests allowed to wait for a slot; more are refused


class Engine:
    def __init__(self, scheduler: Scheduler, config: EngineConfig | None = None, observer: Observer | None = None):
        self.scheduler = scheduler
        self.config = config or EngineConfig()
        self.observer = observer  # hears every update after its request does (the metrics)
        self.inbox: deque[Request] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.error: str | None = None  # set if the loop itself died
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
            if self.num_waiting >= self.config.max_queue:
                raise QueueFull(f"{self.num_waiting} requests are already waiting (--max-queue "
                                f"{self.config.max_queue}); retry later")
            self.inbox.append(request)
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
        return len(self.inbox) + self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    # --- the engine thread -----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.stopping and not self.inbox and not self.scheduler.has_work():
                        self.cond.wait()
                    if self.stopping:
                        break
                    while self.inbox:
                        self.scheduler.add(self.inbox.popleft())
                self._deliver(self.scheduler.step())
        except BaseException as e:  # a bug, not bad input: keep the message for /health
            self.error = f"engine loop died: {e!r}"
            log.error("%s\n%s", self.error, traceback.format_exc())
        finally:
            self.stopping = True
            with self.cond:
                while self.inbox:
                    self.scheduler.add(self.inbox.popleft())
            self._deliver(self.scheduler.fail_all("the server is shutting down" if self.error is None else self.error))

    def _deliver(self, progress: Progress) -> None:
        logged: set[int] = set()  # a failed group's requests share one exception: log it once
        for request, update in progress:
            if request.exception is not None and update.error is not None and id(request.exception) not in logged:
                logged.add(id(request.exception))
                log.error("%s", update.error, exc_info=request.exception)
            try:
                request.on_update(update)
                if self.observer is not None:
                    self.observer(request, update)
            except Exception:  # a caller's callback must never take the engine down
                log.error("update callback failed\n%s", traceback.format_exc())
