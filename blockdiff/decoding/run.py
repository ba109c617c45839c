"""The decode loop shared by every mode: start, then step until every sequence has finished."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch

from blockdiff.decoding import ar, diffusion, linear_spec, quad_spec
from blockdiff.decoding.batch import DecodeBatch, EventHook, EveryStep
from blockdiff.decoding.sequence import Sequence
from blockdiff.model.transformer import Transformer

# on_step(mode, rows, tokens committed, seconds): one decode step, timed
StepHook = Callable[[str, int, int, float], None]


class Decoder(Protocol):
    """What each mode's module (ar.py, diffusion.py, linear_spec.py, quad_spec.py) provides."""

    def extra_slots(self, block_length: int) -> int:
        """KV-cache slots a sequence needs beyond its prompt and max_new_tokens."""

    def start(self, batch: DecodeBatch) -> None:
        """Prefill the batch's prompts and emit each sequence's first token."""

    def step(self, batch: DecodeBatch) -> None:
        """One decode step for every row; the driver retires finished rows afterwards."""


DECODERS: dict[str, Decoder] = {"ar": ar, "diffusion": diffusion, "linear_spec": linear_spec, "quad_spec": quad_spec}


@torch.inference_mode()
def decode(model: Transformer, seqs: list[Sequence], mask_token_id: int | None,
           on_event: EventHook | None = None, on_progress: Callable[[int], None] | None = None,
           on_step: StepHook | None = None) -> list[Sequence]:
    """Decode sequences that share a mode and block length as one batch.

    on_progress(n) is told how many tokens were emitted since its last call; on_step(mode,
    rows, tokens, seconds) times every decode step (what mode="auto" learns from).
    """
    params = seqs[0].params
    if any((s.params.mode, s.params.block_length) != (params.mode, params.block_length) for s in seqs):
        raise ValueError("one batch must share mode and block_length")
    if params.mode != "ar" and mask_token_id is None:
        raise ValueError(f"mode {params.mode!r} needs a mask token, and this model has none")
    decoder = DECODERS[params.mode]
    batch = DecodeBatch(model, seqs, mask_token_id, decoder.extra_slots(params.block_length),
                        EveryStep(on_event) if on_event is not None else None)
    emitted = 0

    def report() -> int:
        nonlocal emitted
        total = sum(len(s.output_ids) for s in seqs)
        new, emitted = total - emitted, total
        if on_progress and new > 0:
            on_progress(new)
        return new

    decoder.start(batch)
    batch.retire()
    report()
    while len(batch):
        rows, started = len(batch), time.perf_counter()
        decoder.step(batch)
        batch.retire()
        new = report()
        if on_step is not None:
            on_step(params.mode, rows, new, time.perf_counter() - started)
    return seqs
