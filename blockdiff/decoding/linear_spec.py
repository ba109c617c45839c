"""Self-speculation: a bidirectional draft pass (draft adapter on) fills the block, a causal
verify pass (adapter off) checks it. Lossless at temperature 0; SPEC section 3."""
from __future__ import annotations

import torch

from blockdiff.decoding import verify
from blockdiff.decoding.batch import DecodeBatch
from blockdiff.decoding.sequence import Sequence


def extra_slots(seq: Sequence) -> int:
    return seq.params.block_length


def start(batch: DecodeBatch) -> None:
    batch.prefill()


def step(batch: DecodeBatch) -> None:
    L = batch.block_length
    block = torch.cat([batch.pending_tokens(), batch.masks(L - 1)], dim=1)  # (B, L)
    hidden = batch.draft_pass(block)  # (B, L, hidden)
    drafts, draft_probs = batch.draft_tokens(hidden[:, 1:])  # (B, L-1): slot i predicts slot i
    for row in range(len(batch)):
        if batch.observed(row):
            batch.event("draft", row, drafts=drafts[row].tolist())

    candidate = torch.cat([block[:, :1], drafts], dim=1)  # (B, L)
    hidden = batch.forward(candidate, "causal")  # writes keys/values past each row's length
    target_logits = batch.model.logits(hidden)  # (B, L, V): shifted, slot i predicts slot i+1
    verdicts = verify.accept_batch(batch, drafts, draft_probs, target_logits)
    for row, (accepted, bonus) in enumerate(verdicts):
        verify.commit_row(batch, row, drafts[row], accepted, bonus, target_logits[row])
    batch.cache.advance([1 + accepted for accepted, _ in verdicts])  # the pending token and the confirmed drafts
