"""The decoders, one module per mode, and what each provides to the scheduler that drives them."""
from __future__ import annotations

from typing import Protocol

from blockdiff.decoding import ar, diffusion, linear_spec, quad_spec
from blockdiff.decoding.batch import DecodeBatch


class Decoder(Protocol):
    """What each mode's module (ar.py, diffusion.py, linear_spec.py, quad_spec.py) provides."""

    def extra_slots(self, block_length: int) -> int:
        """KV-cache slots a sequence needs beyond its prompt and max_new_tokens."""

    def start(self, batch: DecodeBatch) -> None:
        """Prefill the batch's prompts and emit each sequence's first token."""

    def step(self, batch: DecodeBatch) -> None:
        """One decode step for every row; the driver retires finished rows afterwards."""


DECODERS: dict[str, Decoder] = {"ar": ar, "diffusion": diffusion, "linear_spec": linear_spec, "quad_spec": quad_spec}
