"""Autoregressive decoding: one causal forward per token."""
from __future__ import annotations

from blockdiff.decoding.batch import DecodeBatch
from blockdiff.decoding.sequence import Sequence


def extra_slots(seq: Sequence) -> int:
    return 1


def start(batch: DecodeBatch) -> None:
    batch.prefill()


def step(batch: DecodeBatch) -> None:
    hidden = batch.forward(batch.pending_tokens(), "causal")  # (B, 1, hidden)
    batch.cache.advance(1)
    logits = batch.model.logits(hidden[:, -1])  # (B, V)
    for row, (seq, token) in enumerate(zip(batch.seqs, batch.next_tokens(logits))):
        seq.metrics.steps += 1
        batch.emit(row, [token], logits[row:row + 1])
