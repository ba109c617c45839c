"""The decoders, one module per mode (and infill.py for fill-in-the-middle), and what each
provides to the scheduler that drives them."""
from __future__ import annotations

from typing import Protocol

from blockdiff.decoding import ar, diffusion, infill, linear_spec, quad_spec
from blockdiff.decoding.batch import DecodeBatch
from blockdiff.decoding.sequence import Sequence


class Decoder(Protocol):
    """What each decoder's module provides."""

    def extra_slots(self, seq: Sequence) -> int:
        """KV-cache slots the sequence needs beyond its prompt and max_new_tokens."""

    def start(self, batch: DecodeBatch) -> None:
        """Prefill the batch's prompts (and emit each sequence's first token, where the mode can)."""

    def step(self, batch: DecodeBatch) -> None:
        """One decode step for every row; the driver retires finished rows afterwards."""


DECODERS: dict[str, Decoder] = {"ar": ar, "diffusion": diffusion, "linear_spec": linear_spec, "quad_spec": quad_spec}


def decoder_for(seq: Sequence) -> Decoder:
    """A sequence with a suffix fills the gap before it; the others decode in their mode."""
    return infill if seq.suffix_ids is not None else DECODERS[seq.params.mode]
