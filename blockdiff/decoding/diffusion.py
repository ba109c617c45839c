"""Block diffusion (FastDiffuser): denoise a block of MASKs with bidirectional passes that
read the cache without writing it, then one causal pass commits the block; SPEC section 3.
The denoising passes are draft passes: a draft adapter, if loaded, is on for them (it is what
learned to denoise when the base model is a plain AR model) and off for the commit pass."""
from __future__ import annotations

import torch

from blockdiff.decoding.batch import DecodeBatch
from blockdiff.decoding.sequence import Sequence


def extra_slots(seq: Sequence) -> int:
    return seq.params.block_length


def slots_to_commit(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """(k,) confidence of a pass's picks for k masked slots -> (k,) bool: every pick at least
    `threshold` confident, and always the most confident one, so each pass makes progress."""
    commit = confidence >= threshold
    commit[confidence.argmax()] = True
    return commit


def start(batch: DecodeBatch) -> None:
    batch.prefill()


def step(batch: DecodeBatch) -> None:
    """Decode one block per sequence."""
    L, B = batch.block_length, len(batch)
    block = torch.cat([batch.pending_tokens(), batch.masks(L - 1)], dim=1)  # (B, L)
    slot = torch.arange(L)
    # slots this block must fill: a final block may need fewer than L-1
    width = torch.tensor([min(L - 1, seq.remaining) for seq in batch.seqs])
    needed = (slot[None, :] >= 1) & (slot[None, :] <= width[:, None])  # (B, L)
    end = width + 1  # per row, one past the last slot to emit
    active = needed.any(dim=1).tolist()
    denoise_step = 0
    while any(active):
        stepped = list(active)  # rows that take this pass (the loop below updates `active`)
        hidden = batch.draft_pass(block, counted=active)  # (B, L, hidden)
        logits = batch.model.logits(hidden)  # (B, L, V): no shift, slot i predicts slot i
        picks = batch.pick(logits, drawn=needed & torch.tensor(active)[:, None])  # (B, L) tokens and confidence
        for row, seq in enumerate(batch.seqs):
            if not active[row]:
                continue
            slots = needed[row].nonzero()[:, 0]
            tokens, confidence = picks.tokens[row, slots], picks.confidence[row, slots]
            commit = slots_to_commit(confidence, seq.params.threshold)
            block[row, slots[commit]] = tokens[commit]
            needed[row, slots[commit]] = False
            # stop early once a stop token or a stop string is decoded with no MASK left of it
            filled = int(needed[row].nonzero()[0, 0]) if needed[row].any() else int(end[row])
            stops = [i for i in range(1, filled) if int(block[row, i]) in seq.stop_ids
                     and seq.may_stop(len(seq.output_ids) + i)]
            done = bool(stops)
            if stops:
                end[row] = stops[0] + 1
            elif needed[row].any() and seq.completes_stop_string(block[row, 1:filled].tolist()):
                end[row], done = filled, True  # emitting the block cuts its text at the stop string
            active[row] = not done and bool(needed[row].any())
        for row in range(B):
            if stepped[row] and batch.observed(row):
                batch.event("denoise", row, step=denoise_step, block=block[row].tolist(),
                            masked=(needed[row] & (slot < end[row])).tolist(), end=int(end[row]))
        denoise_step += 1

    for row, seq in enumerate(batch.seqs):
        seq.metrics.steps += 1
        batch.emit(row, block[row, 1:int(end[row])].tolist())
    live = [not seq.finished for seq in batch.seqs]
    if not any(live):
        return
    # commit pass: the only one that writes the cache. Rows still going have complete blocks;
    # finished rows ride along uncounted until the driver retires them after this step.
    hidden = batch.forward(block, "causal", counted=live)  # (B, L, hidden)
    batch.cache.advance(L)
    tokens = batch.next_tokens(batch.model.logits(hidden[:, -1]))  # logits (B, V)
    for row, token in enumerate(tokens):
        if live[row]:
            batch.emit(row, [token])
