"""Fill-in-the-middle with block diffusion (the `suffix` of /v1/completions): the decoder of
a sequence with `suffix_ids`, one row per batch.

Layout, one row:  prefix (P tokens) | middle (N = max_new_tokens slots) | suffix (S tokens)
with positions 0 .. P+N+S-1. The prefix is prefilled causally into the KV cache once. Each
step then runs the middle (committed tokens and MASKs) and the suffix bidirectionally over
the cached prefix as a draft pass (the draft adapter on, as in diffusion's denoising passes;
the cache is read, not written), and commits the confident slots of the current block by
diffusion's rule, left to right, block by block. A finished block is final and emitted.

Limits, stated honestly:
- the gap has exactly max_new_tokens slots: the suffix's positions assume it. A stop token
  inside the middle ends the answer early, but the model filled the gap with that length in
  mind; short gaps want small max_tokens.
- the middle and suffix are recomputed every pass (only the prefix is cached).
- models trained only with left-to-right blocks were never taught to read a suffix, so the
  quality of infilling is whatever the checkpoint's bidirectional pass gives.
- one request per batch: infilling is not batched with other requests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.decoding.batch import DecodeBatch
from blockdiff.decoding.diffusion import slots_to_commit
from blockdiff.decoding.sampler import pick
from blockdiff.decoding.sequence import Sequence


@dataclass
class Gap:
    """The row's state between steps (batch.row_state[0])."""
    window: torch.Tensor  # (1, N+S) the middle, MASKs where still open, then the suffix
    open: torch.Tensor  # (N,) bool: middle slots not yet committed
    block_start: int = 0  # the first slot of the block being filled


def extra_slots(seq: Sequence) -> int:
    return len(seq.suffix_ids)  # the suffix's scratch keys/values after the middle


def start(batch: DecodeBatch) -> None:
    """Cache the prefix (causal); nothing is emitted: the first middle slot is a MASK too."""
    if len(batch) != 1:
        raise ValueError("fill-in-the-middle decodes one sequence per batch")
    seq = batch.seqs[0]
    tokens, lengths = batch.prompt_tokens()  # (1, P)
    batch.cache_prompts(tokens, lengths, tokens.shape[1])
    width = seq.params.max_new_tokens
    window = torch.cat([batch.masks(width), torch.tensor([seq.suffix_ids])], dim=1)  # (1, N+S)
    batch.row_state[0] = Gap(window, torch.ones(width, dtype=torch.bool))


def step(batch: DecodeBatch) -> None:
    """One bidirectional denoising pass over middle + suffix."""
    seq, gap = batch.seqs[0], batch.row_state[0]
    lo = gap.block_start
    hi = min(lo + seq.params.block_length, len(gap.open))
    hidden = batch.draft_pass(gap.window)  # (1, N+S, hidden)
    slots = lo + gap.open[lo:hi].nonzero()[:, 0]  # (k,) still-masked slots of this block
    logits = batch.model.logits(hidden[0, slots])  # (k, V): no shift, slot i predicts slot i
    picks = pick(logits[None], [seq.params], [seq.generator])
    tokens, confidence = picks.tokens[0], picks.confidence[0]  # (k,) each
    every = torch.ones(1, len(slots), dtype=torch.bool)  # (1, k): each pick was drawn
    commit = slots_to_commit(confidence[None], every, torch.tensor([seq.params.threshold]))[0]  # (k,)
    gap.window[0, slots[commit]] = tokens[commit]
    gap.open[slots[commit]] = False
    if not gap.open[lo:hi].any():
        seq.metrics.steps += 1
        seq.append(gap.window[0, lo:hi].tolist())
        gap.block_start = hi
