"""Turning sequence ids into this process's noised micro-batches for one optimizer step.

The global batch of a step is split across processes and then micro-batches, but every
sequence's noise is seeded by (run seed, step, its slot in the global batch): the same
global batch gives the same noise however it is split, which is what makes 1 process and
N processes (or 1 micro-batch and N accumulated ones) train the same way.
"""
from __future__ import annotations

import torch

from blockdiff.train.data import PackedData
from blockdiff.train.objective import NoisedBatch, ObjectiveConfig, add_noise

_MOD = 2 ** 61 - 1


def noise_seed(run_seed: int, step: int, slot: int) -> int:
    return ((run_seed * 1_000_003 + step) * 1_000_033 + slot) % _MOD


def micro_batches(data: PackedData, ids: list[int], first_slot: int, micro: int, step: int, run_seed: int,
                  mask_token_id: int, cfg: ObjectiveConfig, device: torch.device) -> list[NoisedBatch]:
    """`ids` are this process's sequences, starting at global slot `first_slot`."""
    out = []
    for start in range(0, len(ids), micro):
        rows = torch.tensor(ids[start: start + micro])
        x0, loss_mask = data.tokens[rows], data.loss_mask[rows]  # (b, N)
        if cfg.kind == "ar":  # no noisy half: nothing masked
            out.append(NoisedBatch(x0.to(device), loss_mask.to(device), x0.to(device),
                                   torch.zeros_like(loss_mask, device=device), torch.ones(x0.shape, device=device)))
            continue
        seeds = [noise_seed(run_seed, step, first_slot + start + k) for k in range(len(rows))]
        out.append(add_noise(x0.to(device), loss_mask.to(device), mask_token_id, cfg, seeds))
    return out
