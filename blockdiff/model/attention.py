"""Attention for inference whose every output row is independent of how queries are grouped.

A query's result must not depend on how many other queries share its forward, nor on how
many masked keys follow the ones it sees: a verify pass then computes exactly the logits
that one-token AR steps compute, and speculative decoding is lossless in bf16 too (SPEC
section 3). Fused kernels (SDPA's flash path) tile queries and keys, and float32 GEMMs pick
algorithms by shape, so neither gives that. This computes the scores and the weighted sum
with two batched matrix products whose rows are independent in the low-precision GEMM
(checked per op by tests/test_width_invariance.py on the machine at hand), and the softmax
in float32 over the whole span, where masked keys contribute exact zeros.

Forwards that compute gradients (training) use SDPA instead: its backward does not
materialise the scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def key_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, T, S) bool visibility -> (B, 1, 1, T, S) float32 bias: 0 where seen, -inf where not."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias[:, :, None]  # (B, 1, 1, T, S): broadcasts over KV heads and their query groups


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """q (B, T, H, D), k and v (B, Hkv, S, D), bias from `key_bias` or None (every key seen)
    -> (B, T, H*D). Query head h reads KV head h // (H // Hkv), as in HF's repeat_kv."""
    B, T, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    q = q.reshape(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)  # (B, Hkv, G*T, D)
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, Hkv, G*T, S), the model dtype
    scale = D ** -0.5
    if bias is None:
        scores = scores.float().mul_(scale)
    else:
        scores = torch.add(bias, scores.view(B, Hkv, G, T, S), alpha=scale).view(B, Hkv, G * T, S)  # float32
    probs = torch.softmax(scores, dim=-1).to(v.dtype)  # (B, Hkv, G*T, S)
    y = torch.matmul(probs, v)  # (B, Hkv, G*T, D)
    return y.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)  # (B, T, H*D)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool) -> torch.Tensor:
    """The same contract for forwards with gradients: q (B, T, H, D) -> (B, T, H*D); with
    is_causal, SDPA applies the causal mask itself and `mask` is not needed."""
    B, T, H, D = q.shape
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=None if is_causal else mask, is_causal=is_causal,
                                       enable_gqa=H != k.shape[1])  # (B, H, T, D)
    return y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
