"""AdamW with decoupled weight decay on matrices only, and a warmup-stable-decay schedule."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from blockdiff.train.config import OptimConfig


def make_optimizer(params: dict[str, nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    # Norm gains (1-D) are not decayed: pulling them to 0 would shrink activations, not overfitting.
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def wsd_factor(step: int, cfg: OptimConfig) -> float:
    """LR multiplier at `step` (0-based): linear warmup, flat, linear decay to min_lr over the
    last decay_fraction of max_steps. A pure function of step, so resuming is exact."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = int(cfg.max_steps * cfg.decay_fraction)
    decay_start = cfg.max_steps - decay_steps
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    if decay_steps <= 0 or step < decay_start:
        return 1.0
    frac = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - floor) * frac


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(wsd_factor, cfg=cfg))
