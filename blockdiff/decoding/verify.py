"""Accepting drafted tokens against AR predictions, shared by linear_spec and quad_spec.

Greedy: accept the longest prefix the AR argmax agrees with, then the AR token after it.
Sampling: the speculative rejection rule (Leviathan et al., Chen et al.): accept draft i
with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from
norm(max(0, p_i - q_i)). The emitted tokens then follow the AR distribution exactly.
"""
from __future__ import annotations

import torch

from blockdiff.decoding.sampler import gumbel_argmax, row_chunks, row_probabilities, uniform_noise
from blockdiff.sampling import SamplingParams


def accept(drafts: torch.Tensor, draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
           params: list[SamplingParams], generators: list[torch.Generator | None]) -> tuple[list[int], list[int]]:
    """drafts (B, K) on the host, draft_probs (B, K, V) (None: every row is greedy; a greedy
    row's entries are not read), target_logits (B, K+1, V) where [b, i] is the AR prediction
    for the slot of drafts[b, i] (i = K: the slot after the last draft). Returns, per row, the
    number of drafts accepted and the token that follows them.

    A sampled row draws K uniforms for its accept tests, then V for the token after them, from
    its own generator; the rest is one computation for the batch and one host copy."""
    accepted, bonus = accept_on_device(drafts, draft_probs, target_logits, params, generators)
    both = torch.stack([accepted, bonus]).cpu()  # (2, B): one host copy
    return both[0].tolist(), both[1].tolist()


def accept_on_device(drafts, draft_probs, target_logits, params, generators) -> tuple[torch.Tensor, torch.Tensor]:
    """`accept`'s work, all on the logits' device: accepted (B,), the token after them (B,)."""
    B, K = drafts.shape
    device = target_logits.device
    on_device = drafts.to(device)
    if draft_probs is None or any(p.greedy for p in params):
        ar = target_logits.argmax(-1)  # (B, K+1)
        accepted = (ar[:, :K] == on_device).long().cumprod(1).sum(1)  # (B,): the greedy rule
        bonus = ar.gather(1, accepted[:, None])[:, 0]  # (B,)
        if draft_probs is None:
            return accepted, bonus
    rejected = torch.empty(B, dtype=torch.long, device=device)
    residual = torch.empty(B, dtype=torch.long, device=device)
    for rows in row_chunks(B, device):
        if all(p.greedy for p in params[rows]):
            continue  # nothing to sample: the greedy verdicts stand
        rejected[rows], residual[rows] = _rejection_sample(on_device[rows], draft_probs[rows], target_logits[rows],
                                                           params[rows], generators[rows])
    if not any(p.greedy for p in params):
        return rejected, residual
    greedy = torch.tensor([p.greedy for p in params], device=device)  # (B,)
    return torch.where(greedy, accepted, rejected), torch.where(greedy, bonus, residual)


def _rejection_sample(drafts, draft_probs, target_logits, params, generators):
    """The rejection rule for every row (greedy rows' results are discarded): accept draft i
    while u_i < p_i(d_i) / q_i(d_i); at the first rejection sample norm(max(0, p_i - q_i)),
    after K acceptances sample p_K. Returns accepted (B,), the token after them (B,)."""
    B, K = drafts.shape
    sampled = [None if p.greedy else g for p, g in zip(params, generators)]
    u = uniform_noise(sampled, (K,), target_logits.device)  # (B, K), drawn before the token's noise
    noise = uniform_noise(sampled, (target_logits.shape[-1],), target_logits.device)  # (B, V)
    p = row_probabilities(target_logits, params)  # (B, K+1, V)
    q = draft_probs.to(p.dtype)  # (B, K, V)
    index = drafts[..., None]  # (B, K, 1)
    ratio = p[:, :K].gather(2, index)[..., 0] / q.gather(2, index)[..., 0].clamp_min(1e-300)  # (B, K)
    passed = torch.cat([u < ratio, torch.zeros(B, 1, dtype=torch.bool, device=u.device)], dim=1)  # (B, K+1)
    accepted = passed.long().cumprod(1).sum(1)  # (B,): the first failed test, or K
    rows = torch.arange(B, device=u.device)
    p_at = p[rows, accepted]  # (B, V)
    q_at = q[rows, accepted.clamp_max(K - 1)] if K else torch.zeros_like(p_at)  # (B, V); unread where all passed
    residual = (p_at - q_at).clamp_min(0.0)  # (B, V)
    total = residual.sum(-1, keepdim=True)  # (B, 1)
    target = torch.where(total > 0, residual / total.clamp_min(1e-300), p_at)  # (B, V)
    target = torch.where((accepted == K)[:, None], p_at, target)  # every draft passed: p_K itself
    return accepted, gumbel_argmax(target, noise)


def accept_batch(batch, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
                 target_logits: torch.Tensor) -> list[tuple[int, int]]:
    """`accept` for a DecodeBatch's rows: drafts (B, K), draft_probs (B, K, V) as
    `DecodeBatch.pick_tokens` gives them, target_logits (B, K+1, V), which each row's grammar
    constrains along its drafts."""
    target_logits = batch.constrained(target_logits, drafts)
    accepted, bonus = accept(drafts, draft_probs, target_logits, [s.params for s in batch.seqs],
                             [s.generator for s in batch.seqs])
    return list(zip(accepted, bonus))


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
