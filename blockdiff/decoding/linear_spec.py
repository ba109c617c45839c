"""Self-speculation: a bidirectional draft pass (draft adapter on) fills the block, a causal
verify pass (adapter off) checks it. Lossless at temperature 0; SPEC section 3."""
from __future__ import annotations

import torch

from blockdiff.decoding import verify
from blockdiff.decoding.batch import DecodeBatch


def extra_slots(block_length: int) -> int:
    return block_length


def start(batch: DecodeBatch) -> None:
    batch.prefill()


def step(batch: DecodeBatch) -> None:
    L, B = batch.block_length, len(batch)
    block = torch.cat([batch.pending_tokens(), batch.masks(L - 1)], dim=1)  # (B, L)
    hidden = batch.draft_pass(block)  # (B, L, hidden)
    draft_logits = batch.model.logits(hidden[:, 1:])  # (B, L-1, V): no shift, slot i predicts slot i
    drafts, draft_probs = [], []
    for row in range(B):
        tokens, _, probs = batch.sample(row, draft_logits[row], need_probs=not batch.seqs[row].params.greedy)
        drafts.append(tokens)
        draft_probs.append(probs)
        if batch.observed(row):
            batch.event("draft", row, drafts=tokens.tolist())

    candidate = torch.cat([block[:, :1], torch.stack(drafts)], dim=1)  # (B, L)
    hidden = batch.forward(candidate, "causal")  # writes keys/values past each row's length
    target_logits = batch.model.logits(hidden)  # (B, L, V): shifted, slot i predicts slot i+1
    advance = []
    for row in range(B):
        accepted = verify.verify_row(batch, row, drafts[row], draft_probs[row], target_logits[row])
        advance.append(1 + accepted)  # the pending token and the confirmed drafts
    batch.cache.advance(advance)
