"""The scheduler: continuous batching of requests in every mode, one synchronous step at a time.

`add` queues a request. `step` admits waiting requests (up to `max_running` sequences across
all groups), prefills the newcomers of each (mode, block_length) group as a batch of their own
(several where their prompt lengths differ widely: `prefill_chunks`) and merges them into that
group's running DecodeBatch, then runs one decode step of every group in the order the groups
started, and returns an Update for each request that made progress. A prompt longer than
PREFILL_CHUNK is cached a pass per step while other sequences decode (`_prefill`).
Groups in different modes share the step, not a forward. Every row keeps its own cache length,
generator and draft state, so a sequence's tokens do not depend on who shares its batch.

Both front ends drive this one object: `LLM.generate` adds its prompts and `drain`s it; the
server's engine thread (server/engine.py) steps it while requests wait or run. One thread owns
a scheduler: nothing here takes a lock.

Load, for mode="auto", is the number of sequences decoding together across every group: a
request's mode is chosen when it is admitted, at the load it joins (the sequences running plus
the newcomers admitted with it), and every decode step reports its throughput at the load it
ran under.

A spec mode's group takes plain AR steps (the verifier's own step: the same tokens at
temperature 0, the same distribution when sampling) while at least `spec_limits[mode]`
sequences run, the batch size past which speculation was measured to lose on this machine
(engine/block_lengths.py). Its rows keep their state: linear_spec drafts afresh each step,
and quad_spec's kept drafts are merely stale when speculation resumes (rejected, never
wrong). A group holding a seeded sampled request always speculates, so the seed reproduces
its text whatever the load.

A failure (prefill or a decode step raising, e.g. out of memory) ends the requests of that
group with an error update and the exception on `Request.exception`; the other groups go on.
"""
from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from blockdiff.decoding import ar
from blockdiff.decoding.batch import DecodeBatch
from blockdiff.decoding.decoders import Decoder, decoder_for
from blockdiff.engine.auto import AutoMode
from blockdiff.engine.request import Request, Update
from blockdiff.engine.steps import StepRouter
from blockdiff.model.transformer import Transformer
from blockdiff.sampling import DEFAULT_BLOCK_LENGTHS

Progress = list[tuple[Request, Update]]


@dataclass
class Group:
    batch: DecodeBatch
    decoder: Decoder
    requests: list[Request] = field(default_factory=list)


def seeded_sample(params) -> bool:
    """A sampled request with a seed: under mode="auto" it runs `ar`, and in a spec mode it
    always speculates, because a spec step draws other samples from the same seed than an AR
    step (lossless in distribution, not per sample), and the same seed must give the same
    text whatever the selector has measured or the load is."""
    return params.seed is not None and not params.greedy


# A batched prefill right-pads its prompts to the longest; newcomers whose padding would add
# more than PREFILL_PADDING of their tokens, and more than PREFILL_PADDING_TOKENS slots, are
# prefilled as several batches of similar lengths instead (a forward's fixed cost is about
# that of a few dozen tokens on a CPU; a long prompt among short ones would multiply the work).
PREFILL_PADDING = 0.25
PREFILL_PADDING_TOKENS = 64


def prefill_chunks(requests: list[Request]) -> list[list[Request]]:
    """Requests -> batches to prefill one after another, shortest prompts first, each padded
    by at most PREFILL_PADDING of its tokens or PREFILL_PADDING_TOKENS slots. A row's prefill
    does not depend on the rows beside it, so the split changes no token."""
    chunks: list[list[Request]] = []
    tokens = 0
    for request in sorted(requests, key=lambda r: len(r.seq.prompt_ids)):
        length = len(request.seq.prompt_ids)
        if chunks:
            padded = (len(chunks[-1]) + 1) * length  # the longest so far is this one
            waste = padded - (tokens + length)
            if waste <= max(PREFILL_PADDING * (tokens + length), PREFILL_PADDING_TOKENS):
                chunks[-1].append(request)
                tokens += length
                continue
        chunks.append([request])
        tokens = length
    return chunks


class Scheduler:
    def __init__(self, model: Transformer, auto: AutoMode | None = None, max_running: int = 32,
                 block_lengths: dict[str, int] | None = None, spec_limits: dict[str, int] | None = None):
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        self.model = model
        self.auto = auto or AutoMode()
        self.max_running = max_running
        self.block_lengths = block_lengths or DEFAULT_BLOCK_LENGTHS  # where a request leaves its block length out
        self.spec_limits = spec_limits or {}  # spec mode -> sequences running at which its groups take AR steps
        self.waiting: deque[Request] = deque()
        self.groups: dict[tuple, Group] = {}  # in the order they started
        self.prefilling: deque[tuple[tuple, Group]] = deque()  # admitted, prompts being cached (`_prefill`)
        self.router = StepRouter()  # step events to the requests that asked (Request.on_step)
        self.progress: Progress = []  # the updates of the step being taken

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(len(g.requests) for g in self._admitted())

    def _admitted(self) -> list[Group]:
        """Every group holding slots: the decoding ones, then those still being prefilled."""
        return [*self.groups.values(), *(group for _, group in self.prefilling)]

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.groups or self.prefilling)

    @torch.inference_mode()
    def step(self) -> Progress:
        """Free the slots of aborted requests, admit what fits, prefill (a pass of each long
        prompt batch while others decode), take one decode step of every group; the updates it
        made, in order."""
        self._drop_aborted()
        self._admit(self._take_newcomers())
        self._prefill()
        self._step_groups()
        return self._take_progress()

    def drain(self) -> Iterator[tuple[Request, Update]]:
        """Step until every request added has finished, yielding each update."""
        while self.has_work():
            yield from self.step()

    def fail_all(self, message: str) -> Progress:
        """End every waiting and running request with an error update (the engine is stopping)."""
        pending = list(self.waiting)
        self.waiting.clear()
        for group in self._admitted():
            pending.extend(group.requests)
        self.groups.clear()
        self.prefilling.clear()
        for request in pending:
            self._report(request, error=message)
        return self._take_progress()

    def _take_progress(self) -> Progress:
        progress, self.progress = self.progress, []
        return progress

    def _drop_aborted(self) -> None:
        for key, group in list(self.groups.items()):
            aborted = [r for r in group.requests if r.aborted]
            if not aborted:
                continue
            for request in aborted:
                group.batch.abort(request.seq)
            self._settle(group)
            if not group.requests:
                del self.groups[key]
        for entry in list(self.prefilling):  # a batch being prefilled goes once all of it is aborted
            group = entry[1]
            if all(r.aborted for r in group.requests):
                self.prefilling.remove(entry)
                for request in group.requests:
                    group.batch.abort(request.seq)
                    self._report(request)

    def _take_newcomers(self) -> list[Request]:
        room = self.max_running - self.num_running
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
        load = self.num_running + len(newcomers)
        ar_stepped = frozenset(m for m in self.spec_limits if self._past_limit(m, load))
        by_group: dict[tuple, list[Request]] = {}
        for request in newcomers:
            params = request.seq.params
            mode = params.mode if params.mode != "auto" else "ar" if seeded_sample(params) else \
                self.auto.choose(load, ar_stepped)
            request.seq.params = dataclasses.replace(params, mode=mode,
                                                     block_length=params.block_length or self.block_lengths[mode])
            by_group.setdefault(request.group, []).append(request)
        for key, requests in by_group.items():
            for chunk in prefill_chunks(requests):
                self.prefilling.append((key, self._new_group(chunk)))

    def _prefill(self) -> None:
        """Prefill the admitted batches in order. A prompt longer than PREFILL_CHUNK is cached a
        pass at a time (DecodeBatch.prefill_ahead), one pass a step while other sequences
        decode, so their next token waits for a pass and not for a whole prompt (vLLM's chunked
        prefill), and all at once when none do. A batch whose prompts are cached starts (its
        decoder's last prefill pass, and first tokens) and joins its group."""
        for entry in list(self.prefilling):
            key, group = entry
            try:
                ready = group.batch.prefill_ahead()
                while not ready and not self.groups:
                    ready = group.batch.prefill_ahead()
                if ready:
                    group.decoder.start(group.batch)
            except Exception as e:
                self.prefilling.remove(entry)
                self._fail(group.requests, "prefill failed", e)
                continue
            if ready:
                self.prefilling.remove(entry)
                self._join(key, group)

    def _join(self, key: tuple, group: Group) -> None:
        """Merge a started batch into its group's running batch (or make it the group's)."""
        self._settle(group)
        if not group.requests:
            return
        running = self.groups.get(key)
        if running is None:
            self.groups[key] = group
        else:  # a live group: its batch has at least one row
            running.batch.merge(group.batch)
            running.requests.extend(group.requests)

    def _new_group(self, requests: list[Request]) -> Group:
        seqs = [r.seq for r in requests]
        decoder = decoder_for(seqs[0])
        self.router.add(requests)
        batch = DecodeBatch(self.model, seqs, max(decoder.extra_slots(s) for s in seqs), self.router)
        return Group(batch, decoder, requests)

    def _step_groups(self) -> None:
        for key, group in list(self.groups.items()):  # every group has a running request
            load, started = self.num_running, time.perf_counter()
            emitted = sum(len(r.seq.output_ids) for r in group.requests)
            speculates = self._speculates(key[0], group, load)
            try:
                (group.decoder if speculates else ar).step(group.batch)
            except Exception as e:
                self._fail(group.requests, "decode step failed", e)
                group.requests = []
            else:
                emitted = sum(len(r.seq.output_ids) for r in group.requests) - emitted
                self.auto.record(key[0] if speculates else "ar", load, max(emitted, 0), time.perf_counter() - started)
                self._settle(group)
            if not group.requests:
                del self.groups[key]

    def _past_limit(self, mode: str, load: int) -> bool:
        """Whether `mode` takes AR steps while `load` sequences run."""
        return mode in self.spec_limits and load >= self.spec_limits[mode]

    def _speculates(self, mode: str, group: Group, load: int) -> bool:
        return not self._past_limit(mode, load) or any(seeded_sample(r.seq.params) for r in group.requests)

    def _settle(self, group: Group) -> None:
        """Report progress, then drop finished rows from the batch and the group."""
        for request in group.requests:
            self._report(request)
        group.batch.retire()
        group.requests = [r for r in group.requests if not r.done]

    def _fail(self, requests: list[Request], what: str, error: Exception) -> None:
        for request in requests:
            request.exception = error
            self._report(request, error=f"{what}: {error}")

    def _report(self, request: Request, error: str | None = None) -> None:
        update = request.report(error)
        if request.done:
            self.router.forget(request)
        if update is not None:
            self.progress.append((request, update))
