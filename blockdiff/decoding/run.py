"""The decode loop shared by every mode: start, then step until every sequence has finished."""
from __future__ import annotations

from collections.abc import Callable

import torch

from blockdiff.decoding import ar, diffusion, linear_spec, quad_spec
from blockdiff.decoding.batch import DecodeBatch, EventHook
from blockdiff.engine.sequence import Sequence
from blockdiff.model.transformer import Transformer

DECODERS = {"ar": ar, "diffusion": diffusion, "linear_spec": linear_spec, "quad_spec": quad_spec}


@torch.inference_mode()
def decode(model: Transformer, seqs: list[Sequence], mask_token_id: int | None,
           on_event: EventHook | None = None, on_progress: Callable[[int], None] | None = None) -> list[Sequence]:
    """Decode sequences that share a mode and block length as one batch.

    on_progress(n) is told how many tokens were emitted since its last call.
    """
    params = seqs[0].params
    if any((s.params.mode, s.params.block_length) != (params.mode, params.block_length) for s in seqs):
        raise ValueError("one batch must share mode and block_length")
    if params.mode != "ar" and mask_token_id is None:
        raise ValueError(f"mode {params.mode!r} needs a mask token, and this model has none")
    decoder = DECODERS[params.mode]
    batch = DecodeBatch(model, seqs, mask_token_id, decoder.extra_slots(params.block_length), on_event)
    emitted = 0

    def report():
        nonlocal emitted
        total = sum(len(s.output_ids) for s in seqs)
        if on_progress and total > emitted:
            on_progress(total - emitted)
        emitted = total

    decoder.start(batch)
    batch.retire()
    report()
    while len(batch):
        decoder.step(batch)
        batch.retire()
        report()
    return seqs
