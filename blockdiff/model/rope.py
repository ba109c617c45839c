"""Rotary position embeddings: plain RoPE, YaRN scaling and Llama-4 query scaling."""
from __future__ import annotations

import math

import torch

from blockdiff.config import RopeConfig


def yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies blended between interpolation and extrapolation (YaRN, arXiv 2309.00071)."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolated = 1.0 / pos_freqs
    if rope.yarn_factor is None or rope.yarn_factor <= 1.0:
        return extrapolated, 1.0
    factor, original = rope.yarn_factor, rope.yarn_original_max
    interpolated = 1.0 / (factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.yarn_beta_fast), correction_dim(rope.yarn_beta_slow)
    if rope.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = interpolated * ramp + extrapolated * (1 - ramp)
    attention_factor = rope.yarn_attention_factor or (0.1 * math.log(factor) + 1.0)
    return inv_freq, attention_factor


class Rotary:
    """Computes cos/sin for arbitrary per-token positions (the decoders place tokens freely)."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        self.rope = rope
        self.inv_freq, self.attention_factor = yarn_inv_freq(rope, head_dim)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}  # copies made once, not per forward

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self.inv_freq.to(device)
        return self._inv_freq_on[device]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) positions -> cos and sign-folded sin, each (B, T, 1, D), for `apply_rotary`."""
        angles = positions.float()[..., None] * self._inv_freq(positions.device)  # (B, T, D/2)
        cos = torch.cat([angles.cos(), angles.cos()], dim=-1) * self.attention_factor  # (B, T, D)
        sin = torch.cat([-angles.sin(), angles.sin()], dim=-1) * self.attention_factor  # (B, T, D)
        return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]  # (B, T, 1, D)

    def query_scale(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Llama-4 attention temperature: the identity below original_max positions."""
        beta, original = self.rope.llama4_beta, self.rope.llama4_original_max
        if not beta or not original:
            return None
        scale = 1 + beta * torch.log1p(torch.floor(positions.float() / original))
        return scale.to(dtype)[:, :, None, None]  # (B, T, 1, 1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, D) in the rotate-half layout HF Llama stores Q and K in; cos and sin
    from `Rotary.cos_sin`. rotate_half(x) * sin == roll(x, D/2) * sign-folded sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
