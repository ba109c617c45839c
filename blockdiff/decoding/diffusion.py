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


def slots_to_commit(confidence: torch.Tensor, drawn: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """(B, L) confidence of a pass's picks, (B, L) bool slots they were drawn for, (B,)
    thresholds -> (B, L) bool: every drawn pick at least its row's threshold confident, and in
    each row with a drawn slot always the most confident one, so each pass makes progress."""
    commit = drawn & (confidence >= threshold[:, None])
    best = confidence.masked_fill(~drawn, float("-inf")).argmax(1)  # (B,): the first of equals
    commit[torch.arange(len(best)), best] |= drawn.any(1)
    return commit


def stop_rule(batch: DecodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """What ends each row's sequence this step, for `stop_slots`: its stop tokens (B, S),
    padded with -1, which matches no token, and the first block slot allowed to stop (B,):
    stop tokens count from min_tokens on (Sequence.append's rule)."""
    stops = [sorted(seq.stop_ids) or [-1] for seq in batch.seqs]
    width = max(map(len, stops))
    table = torch.tensor([ids + [-1] * (width - len(ids)) for ids in stops])  # (B, S)
    first = torch.tensor([max(1, seq.params.min_tokens - len(seq.output_ids)) for seq in batch.seqs])  # (B,)
    return table, first


def stop_slots(block: torch.Tensor, rule: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(B, L) block -> (B, L) bool: the slots holding a token that ends their row's sequence."""
    table, first = rule
    is_stop = (block[:, :, None] == table[:, None, :]).any(-1)  # (B, L)
    return is_stop & (torch.arange(block.shape[1])[None, :] >= first[:, None])


def start(batch: DecodeBatch) -> None:
    batch.prefill()


def step(batch: DecodeBatch) -> None:
    """Decode one block per sequence. The rows advance together: each pass is one forward,
    one pick and one host copy for the whole batch; only rows with stop strings are searched
    on the host, one at a time (their text has to be detokenized)."""
    L, B = batch.block_length, len(batch)
    block = torch.cat([batch.pending_tokens(), batch.masks(L - 1)], dim=1)  # (B, L)
    slot = torch.arange(L)
    # slots this block must fill: a final block may need fewer than L-1
    width = torch.tensor([min(L - 1, seq.remaining) for seq in batch.seqs])  # (B,)
    needed = (slot[None, :] >= 1) & (slot[None, :] <= width[:, None])  # (B, L)
    end = width + 1  # per row, one past the last slot to emit
    threshold = torch.tensor([seq.params.threshold for seq in batch.seqs])  # (B,)
    rule = stop_rule(batch)
    stop_strings = [row for row, seq in enumerate(batch.seqs) if seq.params.stop]
    observed = [row for row in range(B) if batch.observed(row)]
    active = needed.any(1)  # (B,)
    denoise_step = 0
    while bool(active.any()):
        drawn = needed & active[:, None]  # (B, L): the slots this pass decides
        hidden = batch.draft_pass(block, counted=active.tolist())  # (B, L, hidden)
        picks = batch.pick(_logits_of(batch, hidden, drawn), drawn=drawn)  # (B, L) tokens and confidence
        commit = slots_to_commit(picks.confidence, drawn, threshold)  # (B, L)
        block = torch.where(commit, picks.tokens, block)
        needed &= ~commit
        # stop early once a stop token or a stop string is decoded with no MASK left of it
        filled = torch.where(needed.any(1), needed.int().argmax(1), end)  # (B,): the first MASK, or the end
        stops = stop_slots(block, rule) & (slot[None, :] < filled[:, None])  # (B, L)
        stopped = active & stops.any(1)
        end = torch.where(stopped, stops.int().argmax(1) + 1, end)
        for row in stop_strings:
            if active[row] and not stopped[row] and needed[row].any() and \
                    batch.seqs[row].completes_stop_string(block[row, 1:filled[row]].tolist()):
                end[row], stopped[row] = filled[row], True  # emitting the block cuts its text at the stop string
        for row in observed:
            if active[row]:
                batch.event("denoise", row, step=denoise_step, block=block[row].tolist(),
                            masked=(needed[row] & (slot < end[row])).tolist(), end=int(end[row]))
        active &= ~stopped & needed.any(1)
        denoise_step += 1

    for row, (seq, tokens, stop) in enumerate(zip(batch.seqs, block.tolist(), end.tolist())):
        seq.metrics.steps += 1
        batch.emit(row, tokens[1:stop])
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


def _logits_of(batch: DecodeBatch, hidden: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """(B, L, hidden) -> (B, L, V) logits of the drawn slots, zeros elsewhere (whose picks go
    unused): the output head, the widest product of a pass, runs over the slots still masked only."""
    B, L, _ = hidden.shape
    rows, slots = drawn.nonzero(as_tuple=True)  # (n,) each
    on_device = rows.to(hidden.device), slots.to(hidden.device)
    logits = batch.model.logits(hidden[on_device])  # (n, V)
    out = logits.new_zeros(B, L, logits.shape[-1])  # (B, L, V)
    out[on_device] = logits
    return out
