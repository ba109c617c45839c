"""Fill-in-the-middle with block diffusion (the `suffix` of /v1/completions).

Layout, one row:  prefix (P tokens) | middle (N = max_new_tokens slots) | suffix (S tokens)
with positions 0 .. P+N+S-1. The prefix is prefilled causally into the KV cache once. Each
pass then runs the middle (committed tokens and MASKs) and the suffix bidirectionally over
the cached prefix, reading the cache without writing it, and commits the confident slots of
the current block, left to right, block by block (as diffusion mode does, and always at
least one slot per pass). A finished block is final and streamed. Like diffusion mode's
denoising passes, these passes run a draft adapter if one is loaded; the prefix pass does not.

Limits, stated honestly:
- the gap has exactly max_new_tokens slots: the suffix's positions assume it. A stop token
  inside the middle ends the answer early, but the model filled the gap with that length in
  mind; short gaps want small max_tokens.
- the middle and suffix are recomputed every pass (only the prefix is cached).
- models trained only with left-to-right blocks were never taught to read a suffix, so the
  quality of infilling is whatever the checkpoint's bidirectional pass gives.
- one request per job: infilling is not batched with other requests.
"""
from __future__ import annotations

import torch

from blockdiff.decoding.diffusion import slots_to_commit
from blockdiff.decoding.sampler import pick
from blockdiff.decoding.sequence import Sequence
from blockdiff.model.kv_cache import KVCache
from blockdiff.model.transformer import Transformer


class InfillJob:
    def __init__(self, model: Transformer, seq: Sequence, suffix_ids: list[int]):
        self.model = model
        self.seq = seq
        self.width = seq.params.max_new_tokens  # N
        self.window = torch.tensor([[model.config.mask_token_id] * self.width + list(suffix_ids)])  # (1, N+S)
        self.drafting = torch.ones_like(self.window, dtype=torch.bool)  # adapter gate: the whole window
        self.open = torch.ones(self.width, dtype=torch.bool)  # middle slots not yet committed
        self.block_start = 0
        capacity = len(seq.prompt_ids) + self.window.shape[1]
        self.cache = KVCache(model.config, 1, capacity, model.dtype, model.device)

    def __len__(self) -> int:
        return 0 if self.seq.finished else 1

    def start(self) -> None:
        """Cache the prefix (causal); nothing is emitted: the first middle slot is a MASK too."""
        self.seq.metrics.prefill_nfe += 1
        self.model(torch.tensor([self.seq.prompt_ids]), None, self.cache, "causal")
        self.cache.advance(len(self.seq.prompt_ids))

    def step(self) -> None:
        """One bidirectional denoising pass over middle + suffix."""
        seq = self.seq
        lo = self.block_start
        hi = min(lo + seq.params.block_length, self.width)
        hidden = self.model(self.window, None, self.cache, "bidirectional", self.drafting)  # (1, N+S, hidden)
        seq.metrics.nfe += 1
        slots = lo + self.open[lo:hi].nonzero()[:, 0]  # (k,) still-masked slots of this block
        logits = self.model.logits(hidden[0, slots])  # (k, V): no shift, slot i predicts slot i
        picks = pick(logits[None], [seq.params], [seq.generator])
        tokens, confidence = picks.tokens[0], picks.confidence[0]  # (k,) each
        commit = slots_to_commit(confidence, seq.params.threshold)
        self.window[0, slots[commit]] = tokens[commit]
        self.open[slots[commit]] = False
        if not self.open[lo:hi].any():
            seq.metrics.steps += 1
            seq.append(self.window[0, lo:hi].tolist())
            self.block_start = hi

    def abort(self, seq: Sequence) -> None:
        if not seq.finished:
            seq.finish_reason = "abort"

    def retire(self) -> list[Sequence]:
        return [self.seq] if self.seq.finished else []

    def merge(self, other) -> None:
        raise RuntimeError("infill jobs run one request each")
