"""Attention masks: how new tokens see the cache and each other.

A pattern says how the T new tokens of a forward see one another: "causal",
"bidirectional", or an explicit boolean (T, T) / (B, T, T) tensor (quad_spec's fused
pass, padded prefill). Every new token then sees its row's whole valid cache. A tensor
whose last dimension is the span instead, (T, span) / (B, T, span), is the whole mask,
cache included (training's draft pass sees only the clean blocks before its own).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from blockdiff.model.attention import key_bias

Pattern = str | torch.Tensor


def pattern_matrix(pattern: Pattern, num_new: int, device=None) -> torch.Tensor:
    if isinstance(pattern, torch.Tensor):
        return pattern.to(device=device, dtype=torch.bool)
    if pattern == "causal":
        return torch.ones(num_new, num_new, dtype=torch.bool, device=device).tril()
    if pattern == "bidirectional":
        return torch.ones(num_new, num_new, dtype=torch.bool, device=device)
    raise ValueError(f"unknown attention pattern {pattern!r}: use 'causal', 'bidirectional' or a bool tensor")


@dataclass
class AttentionMask:
    """What a forward's T new tokens see of its span of keys, in the forms both attention
    paths take (model/attention.py)."""
    visible: torch.Tensor | None  # (B, 1, T, span) bool; None: every query sees every key
    is_causal: bool  # `visible` is the plain causal square, which SDPA can apply by itself

    @classmethod
    def build(cls, pattern: Pattern, lengths: torch.Tensor, num_new: int, span: int, device=None) -> "AttentionMask":
        uniform = bool((lengths == lengths[0]).all())
        plain = uniform and isinstance(pattern, str) and span == int(lengths[0]) + num_new
        if plain and (pattern == "bidirectional" or num_new == 1):
            return cls(None, False)
        return cls(visibility(pattern, lengths, num_new, span, device), plain and pattern == "causal" and span == num_new)

    @cached_property
    def bias(self) -> torch.Tensor | None:
        return key_bias(self.visible)

    @cached_property
    def per_query(self) -> torch.Tensor | None:
        """`visible` as the contiguous (B, T, span) bytes the fused CPU kernel reads (model/cpu_kernels.py)."""
        return None if self.visible is None else self.visible[:, 0].contiguous()  # (B, T, span)


def visibility(pattern: Pattern, lengths: torch.Tensor, num_new: int, span: int, device=None) -> torch.Tensor:
    """The (B, 1, T, span) boolean mask: True where a new token sees a key."""
    if isinstance(pattern, torch.Tensor) and pattern.shape[-1] == span != num_new:
        full = pattern.to(device=device, dtype=torch.bool)
        return (full if full.dim() == 3 else full.expand(lengths.shape[0], -1, -1))[:, None]  # (B, 1, T, span)
    within = pattern_matrix(pattern, num_new, device)
    if within.dim() == 2:
        within = within.expand(lengths.shape[0], num_new, num_new)  # (B, T, T)
    lengths = lengths.to(device)
    key_slot = torch.arange(span, device=device)
    relative = key_slot[None, :] - lengths[:, None]  # (B, span): key index among the new tokens
    is_new = (relative >= 0) & (relative < num_new)
    index = relative.clamp(0, num_new - 1)[:, None, :].expand(-1, num_new, -1)  # (B, T, span)
    sees_new = torch.gather(within, 2, index) & is_new[:, None, :]  # (B, T, span)
    sees_cache = (relative < 0)[:, None, :]  # (B, 1, span)
    return (sees_new | sees_cache)[:, None]  # (B, 1, T, span)
