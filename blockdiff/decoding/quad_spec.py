"""Quadratic self-speculation: one fused forward per step both verifies the current draft and
drafts the next block for every possible acceptance length; SPEC section 3.

Layout of a step's L + L*L tokens: the anchors d_0..d_{L-1} come first (a causal chain:
they give the AR verification logits and, being causal, their keys/values can stay in the
cache), then L sub-blocks of L MASKs; sub-block j sits at positions C+j+1 .. C+j+L, sees
anchors d_0..d_j and itself, and drafts the block that follows if d_0..d_j are accepted.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from blockdiff.decoding import verify
from blockdiff.decoding.batch import DecodeBatch
from blockdiff.decoding.sequence import Sequence


@dataclass
class KeptDraft:
    """A row's state between steps (batch.row_state): the block drafted after its pending token."""
    tokens: torch.Tensor  # (L-1,) d_1..d_{L-1}
    probs: torch.Tensor | None  # (L-1, V) their distributions when the row samples, else None


def extra_slots(seq: Sequence) -> int:
    L = seq.params.block_length
    return L * (L + 1) + L


@lru_cache(maxsize=8)
def fused_pattern(L: int) -> torch.Tensor:
    """(L + L*L, L + L*L) bool: which of a step's new tokens each new token sees."""
    T = L + L * L
    sees = torch.zeros(T, T, dtype=torch.bool)
    sees[:L, :L] = torch.ones(L, L, dtype=torch.bool).tril()
    for j in range(L):
        rows = slice(L + j * L, L + (j + 1) * L)
        sees[rows, :j + 1] = True
        sees[rows, rows] = True
    return sees


def fused_offsets(L: int) -> torch.Tensor:
    """(L + L*L,) position of each new token relative to the cache length."""
    anchors = torch.arange(L)
    masks = (torch.arange(L)[:, None] + 1 + torch.arange(L)[None, :]).reshape(-1)  # (L*L,)
    return torch.cat([anchors, masks])


def start(batch: DecodeBatch) -> None:
    """Fused prefill: the prompt (causal, cached) and a MASK block after it (bidirectional).
    A long prompt's head is cached first, in passes of PREFILL_CHUNK (DecodeBatch.cache_prompts);
    the fused pass takes the rest of it."""
    L, B = batch.block_length, len(batch)
    tokens, lengths = batch.prompt_tokens()  # (B, P)
    start = batch.prompt_head_end(tokens.shape[1])
    head = batch.cache_prompts(tokens, lengths, start)  # (B, start, hidden)
    T = tokens.shape[1] - start  # the prompts' width in the fused pass
    rest = [max(n - start, 0) for n in lengths]  # each row's prompt tokens in it
    fused = torch.cat([tokens[:, start:], batch.masks(L)], dim=1)  # (B, T+L)
    positions = torch.zeros(B, T + L, dtype=torch.long)
    pattern = torch.ones(T + L, T + L, dtype=torch.bool).tril().repeat(B, 1, 1)  # (B, T+L, T+L)
    for row, n in enumerate(rest):
        positions[row, :T] = start + torch.arange(T)
        positions[row, T:] = lengths[row] + torch.arange(L)
        pattern[row, T:, :] = False
        pattern[row, T:, :n] = True
        pattern[row, T:, T:] = True
    batch.count_prefill(lengths, start)
    gate = torch.zeros(B, T + L, dtype=torch.bool)
    gate[:, T:] = True
    hidden = batch.model(fused, positions, batch.cache, pattern, gate)  # (B, T+L, hidden)
    batch.cache.advance(rest)
    batch.emit_after_prompts(torch.cat([head, hidden], dim=1), lengths)
    _keep_drafts(batch, hidden[:, T + 1:T + L])


def _keep_drafts(batch: DecodeBatch, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> None:
    """Draft d_1..d_{L-1} from (B, L-1, hidden) MASK rows (and their logits, if computed
    already) and keep them (and their probabilities when sampling) as each row's state for
    the next step; the token before d_1 is each row's pending token, which the sampler head (if
    any) conditions on."""
    drafts, probs = batch.draft_tokens(hidden, logits)  # (B, L-1)
    for row, seq in enumerate(batch.seqs):
        batch.row_state[row] = KeptDraft(drafts[row], None if probs is None else probs[row])
        if not seq.finished and batch.observed(row):  # a finished row's draft is never verified
            batch.event("draft", row, drafts=drafts[row].tolist())


def _kept_draft_probs(batch: DecodeBatch) -> torch.Tensor | None:
    """The kept drafts' (B, L-1, V) probabilities, zeros for greedy rows (which a merge may
    put beside sampled ones); None when every row is greedy."""
    kept = [state.probs for state in batch.row_state]
    present = [p for p in kept if p is not None]
    if not present:
        return None
    return torch.stack([torch.zeros_like(present[0]) if p is None else p for p in kept])


def step(batch: DecodeBatch) -> None:
    L, B = batch.block_length, len(batch)
    drafts = torch.stack([state.tokens for state in batch.row_state])  # (B, L-1)
    draft_probs = _kept_draft_probs(batch)  # (B, L-1, V) or None
    anchors = torch.cat([batch.pending_tokens(), drafts], dim=1)  # (B, L)
    tokens = torch.cat([anchors, batch.masks(L * L)], dim=1)  # (B, L + L*L)
    positions = batch.cache.lengths[:, None] + fused_offsets(L)  # (B, L + L*L)
    gate = torch.zeros(B, L + L * L, dtype=torch.bool)
    gate[:, L:] = True  # the draft adapter serves MASK queries only, never the anchor chain
    hidden = batch.forward(tokens, fused_pattern(L), positions, gate)  # (B, L + L*L, hidden)
    # sub-block j's slots 1..L-1 draft the next block if d_0..d_j are accepted; slot 0 is the
    # bonus's slot. One head product scores the anchors and every candidate draft: the head
    # is the largest weight, and which sub-block is needed is known only after verification.
    candidates = hidden[:, L:].view(B, L, L, hidden.shape[-1])[:, :, 1:]  # (B, L, L-1, hidden)
    logits = batch.model.logits(torch.cat([hidden[:, :L], candidates.flatten(1, 2)], dim=1))  # (B, L + L*(L-1), V)
    target_logits = logits[:, :L]  # (B, L, V): anchor i predicts the slot after it
    verdicts = verify.accept_batch(batch, drafts, draft_probs, target_logits)
    for row, (accepted, bonus) in enumerate(verdicts):
        verify.commit_row(batch, row, drafts[row], accepted, bonus, target_logits[row])
    accepted = torch.tensor([a for a, _ in verdicts])  # (B,)
    batch.cache.advance((1 + accepted).tolist())  # anchors d_0..d_a are exact causal entries
    rows, chosen = torch.arange(B, device=hidden.device), accepted.to(hidden.device)
    candidate_logits = logits[:, L:].view(B, L, L - 1, logits.shape[-1])  # (B, L, L-1, V)
    _keep_drafts(batch, candidates[rows, chosen], candidate_logits[rows, chosen])
