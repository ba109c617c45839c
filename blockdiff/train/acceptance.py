"""Teacher-forced draft acceptance: how many tokens self-speculation would accept on held-out text.

Every block of a validation sequence is drafted the way linear_spec drafts (SPEC section 3):
[tok, MASK x (L-1)] after the clean text before it. A draft token counts as accepted while it
and every draft token before it equal the text. On self-distilled data (the verifier's own
greedy answers) the text IS what the verifier emits, so 1 + the mean accepted length is the
tokens per step linear_spec would reach there; it is the number to watch while training a drafter.
Targets after a stop token are not scored: decoding ends there, and with `data.pad_to_block`
the EOS padding after an answer would otherwise count as easy accepted drafts.
"""
from __future__ import annotations

import torch

from blockdiff.train.objective import ObjectiveModule, draft_mask

REPORTED_POSITIONS = 4  # cumulative acceptance rates for draft positions 1..4 go in the metrics


@torch.no_grad()
def draft_acceptance(objective: ObjectiveModule, x0: torch.Tensor, loss_mask: torch.Tensor,
                     mask_token_id: int, stop_id: int | None = None) -> torch.Tensor:
    """x0, loss_mask (B, N) -> (L,) float64: [blocks drafted, then for each draft position
    k = 1..L-1 the number of blocks whose first k drafts were all accepted]. A slot whose
    preceding token is `stop_id` is not scored."""
    B, N = x0.shape
    L = objective.cfg.block_size
    masked = draft_mask(N, L).to(x0.device)[None, :] & loss_mask  # (B, N)
    xt = torch.where(masked, torch.full_like(x0, mask_token_id), x0)
    noisy, _ = objective.halves(xt, x0)  # (B, N, hidden)
    blocks = N // L  # a partial last block is left out: it has no full draft
    hidden = noisy[:, :blocks * L].reshape(B, blocks, L, -1)[:, :, 1:]  # (B, blocks, L-1, hidden)
    guess = draft_guesses(objective.model, hidden, x0[:, :blocks * L:L])  # (B, blocks, L-1)
    target = x0[:, :blocks * L].view(B, blocks, L)[:, :, 1:]  # (B, blocks, L-1)
    counted = loss_mask[:, :blocks * L].view(B, blocks, L)[:, :, 1:]  # (B, blocks, L-1)
    if stop_id is not None:
        before = x0[:, :blocks * L].view(B, blocks, L)[:, :, :-1]  # (B, blocks, L-1): each slot's previous token
        counted = counted & (before != stop_id)
    accepted = ((guess == target) & counted).long().cumprod(-1)  # (B, blocks, L-1): 1 while all so far match
    drafted = counted[..., 0]  # (B, blocks): blocks whose first draft is scored
    per_position = accepted[drafted].sum(0)  # (L-1,)
    return torch.cat([drafted.sum().view(1), per_position]).double()


def draft_guesses(model, hidden: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(B, blocks, L-1, hidden) draft states, (B, blocks) anchors -> (B, blocks, L-1) drafts,
    through the sampler head where the model has one, as the spec modes draft. Along an
    accepted prefix the head's own picks are the text, so its picks here are the drafts
    linear_spec would make."""
    logits = model.logits(hidden)  # (B, blocks, L-1, V)
    if model.sampler_head is None:
        return logits.argmax(-1)
    B, blocks, K, H = hidden.shape
    drafts = model.sampler_head.greedy_drafts(hidden.reshape(B * blocks, K, H), logits.flatten(0, 1),
                                              anchors.flatten(), model.embed_tokens, model.head_weight)
    return drafts.view(B, blocks, K)


def summarize(totals: torch.Tensor) -> dict:
    """The (L,) sums of draft_acceptance over the validation set -> metrics."""
    blocks = float(totals[0].clamp(min=1))
    rates = (totals[1:] / blocks).tolist()  # P(first k drafts accepted), k = 1..L-1
    return {"val_accept_len": sum(rates), "val_accept_rate": [round(r, 4) for r in rates[:REPORTED_POSITIONS]]}
