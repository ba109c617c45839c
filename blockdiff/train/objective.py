"""The SPEC section 4 training objective: AR + block diffusion on a doubled sequence.

Each clean sequence x_0 (length N) is paired with a noised copy x_t; the model reads
[x_t | x_0] (length 2N, both halves at RoPE positions 0..N-1) under the block-diff mask:
  - noisy query -> noisy key: only within the same block (bidirectional there);
  - noisy query -> clean key: only clean tokens of strictly earlier blocks;
  - clean query -> clean key: token-causal (the clean half is an ordinary AR LM);
  - clean query -> noisy key: never (so the AR path cannot peek at the noise).
Diffusion CE is taken at masked positions of the noisy half against x_0 at the SAME
position (no shift) and divided by the masking probability; AR CE is next-token CE on the
clean half. The caller divides both sums by global token counts (see `counts`).

A draft-only LoRA cannot change the clean half (its adapter is off there, and clean queries
never see noisy keys), so for that target the clean half runs once without autograd into a
KV cache and only the noisy half is differentiated: the same loss and gradients, about half
the compute (`draft_only`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blockdiff.model.kv_cache import KVCache
from blockdiff.model.transformer import Transformer


@dataclass
class ObjectiveConfig:
    kind: str = "joint"  # "joint": SPEC section 4; "ar": plain next-token pretraining
    block_size: int = 32
    eps: float = 1e-3  # p = (1 - eps) t + eps keeps p away from 0, where CE / p explodes
    ar_weight: float = 1.0
    diff_weight: float = 0.3
    position_dependent: bool = False  # Efficient-DLM: mask later slots of a block more often
    position_beta: float | None = None  # None: ln(10) / block_size, so exp(-beta L) = 0.1
    # Fraction of sequences noised the way self-speculation drafts: every block keeps its first
    # token and masks the rest ([tok, MASK x (L-1)] after a clean prefix, SPEC section 3).
    draft_fraction: float = 0.0
    # Draft-shaped sequences start their block grid at a random offset in [0, block_size), so
    # every token of the text is an anchor in some epoch, as any token is at inference.
    anchor_offsets: bool = False
    # Soft targets: KL(AR distribution || draft distribution) at each masked position, weighted
    # this much beside the hard-label CE. The AR distribution for position j is the clean
    # stream's prediction from position j-1, which the objective computes anyway.
    kl_weight: float = 0.0
    # Loss weight slot_decay ** (s - 1) at in-block slot s >= 1 (1 at slot 0): a draft token
    # only counts if every one before it was accepted, so later slots matter less.
    slot_decay: float = 1.0

    def __post_init__(self):
        if self.kind not in ("joint", "ar"):
            raise ValueError(f"objective.kind must be 'joint' or 'ar', got {self.kind!r}")
        if self.block_size <= 0 or not 0 < self.eps < 1:
            raise ValueError("objective: block_size must be positive and eps in (0, 1)")
        if not 0 <= self.draft_fraction <= 1:
            raise ValueError(f"objective.draft_fraction must be in [0, 1], got {self.draft_fraction}")
        if self.kl_weight < 0 or not 0 < self.slot_decay <= 1:
            raise ValueError(f"objective: kl_weight must be >= 0 and slot_decay in (0, 1], "
                             f"got {self.kl_weight} and {self.slot_decay}")


@dataclass
class NoisedBatch:
    x0: torch.Tensor  # (B, N) clean tokens
    loss_mask: torch.Tensor  # (B, N) bool: positions that count in the loss
    xt: torch.Tensor  # (B, N) x_0 with the masked positions (and an offset grid's tail) replaced by the mask token
    masked: torch.Tensor  # (B, N) bool: masked positions that count in the loss
    p: torch.Tensor  # (B, N) float: the probability each position had of being masked


def mask_probabilities(t: torch.Tensor, seq_len: int, cfg: ObjectiveConfig) -> torch.Tensor:
    """t (B,) in [0, 1) -> per-position masking probability (B, N); mean p = (1-eps) t + eps."""
    p = (1 - cfg.eps) * t + cfg.eps  # (B,)
    if not cfg.position_dependent:
        return p[:, None].expand(-1, seq_len).clone()  # (B, N)
    beta = cfg.position_beta if cfg.position_beta is not None else math.log(10.0) / cfg.block_size
    slot = (torch.arange(seq_len) % cfg.block_size).float()  # (N,) index inside its block
    w = torch.exp(beta * (1 - t)[:, None] * slot[None, :])  # (B, N)
    # Rescale so each block keeps mean p (the noise level t means the same thing); clamping
    # at 1 lowers the mean slightly at high t, which the 1/p weighting accounts for anyway.
    blocks = -(-seq_len // cfg.block_size)
    padded = F.pad(w, (0, blocks * cfg.block_size - seq_len), value=float("nan"))
    mean = padded.view(-1, blocks, cfg.block_size).nanmean(-1)  # (B, blocks)
    mean = mean.repeat_interleave(cfg.block_size, dim=1)[:, :seq_len]  # (B, N)
    return (p[:, None] * w / mean).clamp(cfg.eps, 1.0)


def add_noise(x0: torch.Tensor, loss_mask: torch.Tensor, mask_token_id: int, cfg: ObjectiveConfig,
              seeds: list[int]) -> NoisedBatch:
    """Mask each sequence with its own generator seeded by `seeds[b]`, so the noise of a
    sequence does not depend on how the batch is split across processes or micro-batches.

    With `cfg.anchor_offsets`, a draft-shaped sequence is shifted left by its offset o: the
    o tokens that wrap around to the end are out of the loss and masked in x_t, the shape of
    the slots after a draft that run past the text."""
    B, N = x0.shape
    t = torch.empty(B)
    draws = torch.empty(B, N)
    draft_shaped = torch.zeros(B, dtype=torch.bool)
    offsets = torch.zeros(B, dtype=torch.long)
    for b, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        t[b] = torch.rand((), generator=g)
        draws[b] = torch.rand(N, generator=g)
        if cfg.draft_fraction:  # drawn last: runs without it keep their noise
            draft_shaped[b] = torch.rand((), generator=g) < cfg.draft_fraction
            if cfg.anchor_offsets and draft_shaped[b]:
                offsets[b] = torch.randint(cfg.block_size, (), generator=g)
    x0, loss_mask = x0.clone(), loss_mask.clone()
    tail = torch.zeros(B, N, dtype=torch.bool)
    for b in offsets.nonzero().flatten().tolist():
        o = int(offsets[b])
        x0[b], loss_mask[b] = x0[b].roll(-o), loss_mask[b].roll(-o)
        loss_mask[b, N - o:] = False
        tail[b, N - o:] = True
    p = mask_probabilities(t, N, cfg)
    p[draft_shaped] = 1.0  # a drafted block is fully masked but for its first token
    masked = torch.where(draft_shaped[:, None], draft_mask(N, cfg.block_size)[None, :], draws < p) & loss_mask.cpu()
    masked, p, tail = masked.to(x0.device), p.to(x0.device), tail.to(x0.device)
    xt = torch.where(masked | tail, torch.full_like(x0, mask_token_id), x0)
    return NoisedBatch(x0=x0, loss_mask=loss_mask, xt=xt, masked=masked, p=p)


def slot_weights(seq_len: int, cfg: ObjectiveConfig, device=None) -> torch.Tensor:
    """(N,) float: the loss weight of each position by its slot in the block grid."""
    slot = torch.arange(seq_len, device=device) % cfg.block_size
    return cfg.slot_decay ** (slot - 1).clamp(min=0).float()


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """(n, V), (n, V) -> (n,): KL(softmax(teacher) || softmax(student)), in float32 or wider."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    teacher = F.log_softmax(teacher_logits.to(dtype), dim=-1)
    student = F.log_softmax(student_logits.to(dtype), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1)


def draft_mask(seq_len: int, block_size: int) -> torch.Tensor:
    """(N,) bool: every slot but the first of each block, the shape of a self-speculation draft."""
    return torch.arange(seq_len) % block_size != 0


def block_diff_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """(2N, 2N) bool, True = query row may attend to key column; see the module docstring."""
    idx = torch.arange(2 * seq_len, device=device)
    noisy = idx < seq_len  # (2N,)
    pos = idx % seq_len  # (2N,) position inside its half
    blk = pos // block_size
    q_noisy, k_noisy = noisy[:, None], noisy[None, :]
    same_block = blk[:, None] == blk[None, :]
    earlier_block = blk[None, :] < blk[:, None]
    causal = pos[None, :] <= pos[:, None]
    noisy_rows = torch.where(k_noisy, same_block, earlier_block)
    clean_rows = ~k_noisy & causal
    return torch.where(q_noisy, noisy_rows, clean_rows)


def counts(loss_mask: torch.Tensor) -> torch.Tensor:
    """[AR targets, diffusion positions] that count in the loss: the normalisers before
    summing over micro-batches and processes."""
    return torch.stack([loss_mask[:, 1:].sum(), loss_mask.sum()]).double()


class FrozenPrefix:
    """The clean half's keys/values as a read-only cache: the noisy pass attends to them and
    to its own keys without writing in place (in-place cache writes would break autograd)."""
    static = False  # planned on the host, like a dynamic KVCache

    def __init__(self, cache: KVCache):
        n = int(cache.lengths.max())  # the valid slots: a cache's capacity is rounded up
        self.k, self.v = cache.k[:, :, :, :n], cache.v[:, :, :, :n]  # (layers, B, Hkv, N, D)
        self.lengths = cache.lengths
        self.span = 0

    def begin(self, num_new: int) -> None:
        self.span = self.k.shape[3] + num_new

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        k, v = self.k[layer].to(k_new.dtype), self.v[layer].to(v_new.dtype)  # autocast: match the new keys
        return torch.cat([k, k_new], dim=2), torch.cat([v, v_new], dim=2)  # (B, Hkv, span, D)


class ObjectiveModule(nn.Module):
    """Wraps the model so that DDP/FSDP see one forward: batch -> (ar_sum, diff_sum)."""

    def __init__(self, model: Transformer, cfg: ObjectiveConfig, draft_only: bool = False):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.draft_only = draft_only and cfg.kind == "joint"  # only the draft adapter trains

    def halves(self, xt: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states (noisy (B, N, hidden), clean (B, N, hidden)) under the block-diff mask."""
        B, N = x0.shape
        if self.draft_only:
            cache = KVCache(self.model.config, B, N, self.model.dtype, x0.device)
            with torch.no_grad():
                clean = self.model(x0, None, cache, "causal")  # (B, N, hidden)
            cache.advance(N)
            full = block_diff_mask(N, self.cfg.block_size, x0.device)[:N]  # (N, 2N): noisy rows, [noisy | clean] keys
            mask = torch.cat([full[:, N:], full[:, :N]], dim=1)  # (N, 2N): keys in cache order [clean | noisy]
            positions = torch.arange(N, device=x0.device).expand(B, N)  # (B, N)
            gate = torch.ones(B, N, dtype=torch.bool, device=x0.device)
            return self.model(xt, positions, FrozenPrefix(cache), mask, adapter_gate=gate), clean
        positions = torch.arange(N, device=x0.device).repeat(2).expand(B, 2 * N)  # (B, 2N)
        mask = block_diff_mask(N, self.cfg.block_size, x0.device)
        # The draft adapter (if any) runs on the noisy half only: the AR half is the base model.
        gate = torch.zeros(B, 2 * N, dtype=torch.bool, device=x0.device)
        gate[:, :N] = True
        hidden = self.model(torch.cat([xt, x0], dim=1), positions=positions, pattern=mask,
                            adapter_gate=gate)  # (B, 2N, hidden)
        return hidden[:, :N], hidden[:, N:]

    def forward(self, xt: torch.Tensor, x0: torch.Tensor, loss_mask: torch.Tensor,
                masked: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if self.cfg.kind == "ar":
            clean = self.model(x0, pattern="causal")  # (B, N, hidden)
            noisy = None
        else:
            noisy, clean = self.halves(xt, x0)
        ar_targets = loss_mask[:, 1:]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.draft_only):  # a constant then
            ar_logits = self.model.logits(clean[:, :-1][ar_targets])  # (n_ar, vocab)
            ar_sum = F.cross_entropy(ar_logits, x0[:, 1:][ar_targets], reduction="sum")
        if noisy is None or not bool(masked.any()):
            diff_sum = noisy.sum() * 0.0 if noisy is not None else ar_sum * 0.0  # keeps every parameter in the graph
        else:
            targets, drafted = x0[masked], noisy[masked]  # (n_masked,), (n_masked, hidden)
            teacher = self.teacher(clean, masked) if self.cfg.kl_weight else None
            per_slot = self.slot_loss(self.model.logits(drafted), targets, teacher)  # (n_masked,)
            head = self.model.sampler_head
            if head is not None:  # trained on the token before each slot, as it drafts after an accepted one
                previous = torch.cat([x0[:, :1], x0[:, :-1]], dim=1)  # (B, N)
                rescored = head(drafted, self.model.embed_tokens(previous[masked]))  # (n_masked, hidden)
                per_slot = per_slot + self.slot_loss(self.model.logits(rescored), targets, teacher)
            weight = slot_weights(x0.shape[1], self.cfg, x0.device).expand_as(p)[masked] / p[masked]
            diff_sum = (per_slot * weight).sum()
        return torch.stack([ar_sum, diff_sum])

    def teacher(self, clean: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The AR distribution for each masked position (the clean stream's prediction from the
        position before): (has_teacher (n_masked,) bool, logits (n_teacher, vocab)); position 0
        has none."""
        has_teacher = masked.clone()
        has_teacher[:, 0] = False  # (B, N)
        with torch.no_grad():
            logits = self.model.logits(clean[:, :-1][has_teacher[:, 1:]])  # (n_teacher, vocab)
        return has_teacher[masked], logits

    def slot_loss(self, logits: torch.Tensor, targets: torch.Tensor,
                  teacher: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """(n_masked, vocab) draft logits -> (n_masked,) CE + kl_weight * KL to the teacher."""
        loss = F.cross_entropy(logits, targets, reduction="none")
        if teacher is None:
            return loss
        has_teacher, teacher_logits = teacher
        kl = torch.zeros_like(loss)
        kl[has_teacher] = soft_target_kl(logits[has_teacher], teacher_logits)
        return loss + self.cfg.kl_weight * kl


def combine(sums: torch.Tensor, norms: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """(ar_sum, diff_sum) / global counts -> the weighted scalar loss."""
    per_token = sums / norms.clamp(min=1).to(sums.dtype)
    return cfg.ar_weight * per_token[0] + (cfg.diff_weight * per_token[1] if cfg.kind == "joint" else 0.0)
