"""Accepting drafted tokens against AR predictions, shared by linear_spec and quad_spec.

Greedy: accept the longest prefix the AR argmax agrees with, then the AR token after it.
Sampling: the speculative rejection rule (Leviathan et al., Chen et al.): accept draft i
with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from
norm(max(0, p_i - q_i)). The emitted tokens then follow the AR distribution exactly.
"""
from __future__ import annotations

import torch

from blockdiff.sampling import SamplingParams, gumbel_argmax, probabilities


def accept(drafts: torch.Tensor, draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
           params: SamplingParams, generator: torch.Generator | None) -> tuple[int, int]:
    """drafts (K,), draft_probs (K, V) or None (greedy), target_logits (K+1, V) where row i is
    the AR prediction for the slot of drafts[i] (row K: the slot after the last draft).
    Returns (number of drafts accepted, the token that follows them)."""
    K = drafts.shape[0]
    if params.greedy:
        ar = target_logits.argmax(-1).cpu()  # (K+1,)
        agree = (ar[:K] == drafts).long()
        accepted = int(agree.cumprod(0).sum())
        return accepted, int(ar[accepted])
    p = probabilities(target_logits.cpu(), params)  # (K+1, V), beside the CPU generator
    index = drafts[:, None]
    ratio = p[:K].gather(1, index)[:, 0] / draft_probs.gather(1, index)[:, 0].clamp_min(1e-300)  # (K,)
    u = torch.rand(K, dtype=torch.float64, generator=generator)
    for i in range(K):
        if u[i] >= ratio[i]:
            residual = (p[i] - draft_probs[i]).clamp_min(0.0)
            residual = residual / residual.sum() if residual.sum() > 0 else p[i]
            return i, int(gumbel_argmax(residual, generator))
    return K, int(gumbel_argmax(p[K], generator))


def accept_batch(batch, drafts: torch.Tensor, draft_probs: list[torch.Tensor | None] | None,
                 target_logits: torch.Tensor) -> list[tuple[int, int]]:
    """`accept` for every row: drafts (B, K), draft_probs as `DecodeBatch.pick_tokens` gives
    them, target_logits (B, K+1, V), which each row's grammar constrains along its drafts.
    A greedy batch takes one argmax and one host copy."""
    target_logits = batch.constrained(target_logits, drafts)
    if draft_probs is None:
        K = drafts.shape[1]
        ar = target_logits.argmax(-1).cpu()  # (B, K+1)
        accepted = (ar[:, :K] == drafts).long().cumprod(1).sum(1)  # (B,)
        bonus = ar.gather(1, accepted[:, None])[:, 0]  # (B,)
        return list(zip(accepted.tolist(), bonus.tolist()))
    return [accept(drafts[row], draft_probs[row], target_logits[row], seq.params, seq.generator)
            for row, seq in enumerate(batch.seqs)]


def commit_row(batch, row: int, drafts: torch.Tensor, accepted: int, bonus: int,
               target_logits: torch.Tensor) -> None:
    """Emit one sequence's accepted drafts (K,) and the bonus token, which its (K+1, V)
    target logits decided, and record the step."""
    seq = batch.seqs[row]
    if batch.observed(row):  # before the commit it causes, so observers see draft, verify, commit
        batch.event("verify", row, drafts=drafts.tolist(), accepted=accepted, drafted=len(drafts), bonus=bonus)
    kept = batch.emit(row, drafts[:accepted].tolist() + [bonus], target_logits)
    seq.metrics.record_draft(len(drafts), accepted)
    seq.metrics.steps += 1
    seq.metrics.verify_steps += 1
    seq.metrics.committed_in_verify += kept
