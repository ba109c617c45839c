"""Autoregressive decoding: one causal forward per token."""
from __future__ import annotations

from blockdiff.decoding.batch import DecodeBatch


def extra_slots(block_length: int) -> int:
    return 1


def start(batch: DecodeBatch) -> None:
    batch.prefill()


def step(batch: DecodeBatch) -> None:
    hidden = batch.forward(batch.pending_tokens(), "causal")  # (B, 1, hidden)
    batch.cache.advance(1)
    tokens = batch.next_tokens(batch.model.logits(hidden[:, -1]))  # logits (B, V)
    for row, (seq, token) in enumerate(zip(batch.seqs, tokens)):
        seq.metrics.steps += 1
        batch.emit(row, [token])
