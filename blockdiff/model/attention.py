"""Attention for inference whose every output row is independent of how queries are grouped.

A query's result must not depend on how many other queries share its forward, nor on how
many masked keys follow the ones it sees: a verify pass then computes exactly the logits
that one-token AR steps compute, and speculative decoding is lossless in every dtype (SPEC
section 3). Fused kernels (SDPA's flash path) tile queries and keys, and GEMM libraries pick
algorithms by shape, so neither gives that. Here everything is float32 (bf16 keys and values
are widened, which is also more precise than the flash kernel's bf16 probabilities), and the
products are shaped so that no row can tell what else was computed beside it:
- the scores are one product over the head dimension, with at least MIN_ROWS query rows;
- the softmax runs over the whole span, which the KV cache aligns to whole vectors, so
  masked keys add exact zeros and a key sits in the same lane whatever the span;
- the weighted sum over keys is one product per chunk of KEY_CHUNK keys, summed in order,
  so its reduction has the same length and order whatever the span.
tests/test_width_invariance.py checks each of these, and fails without it, on the machine
at hand.

Forwards that compute gradients (training) use SDPA instead: its backward does not
materialise the scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# float32 MKL sums a reduction of another length in another order, and takes another path
# below 6 rows: measured on an AVX512 EPYC, where either changed results.
KEY_CHUNK = 64
MIN_ROWS = 8


def key_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, T, S) bool visibility -> (B, 1, 1, T, S) float32 bias: 0 where seen, -inf where not."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias[:, :, None]  # (B, 1, 1, T, S): broadcasts over KV heads and their query groups


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """q (B, T, H, D), k and v (B, Hkv, S, D), bias from `key_bias` or None (every key seen)
    -> (B, T, H*D) in q's dtype. Query head h reads KV head h // (H // Hkv), as in HF's repeat_kv."""
    B, T, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, M = H // Hkv, H // Hkv * T
    if S % KEY_CHUNK:
        k, v, bias = _pad_keys(k, v, bias, KEY_CHUNK - S % KEY_CHUNK)
        S = k.shape[2]
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32  # float64 models (tests) stay float64
    q = _as(q.reshape(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, M, D), wide)  # (B, Hkv, G*T, D)
    scores = torch.matmul(_at_least_rows(q, MIN_ROWS), _as(k, wide).transpose(-1, -2))[:, :, :M]  # (B, Hkv, G*T, S)
    if bias is None:
        scores = scores.mul_(D ** -0.5)
    else:
        scores = torch.add(bias, scores.view(B, Hkv, G, T, S), alpha=D ** -0.5).view(B, Hkv, M, S)
    probs = torch.softmax(scores, dim=-1)  # (B, Hkv, G*T, S)
    n = S // KEY_CHUNK
    probs = probs.view(B, Hkv, M, n, KEY_CHUNK).transpose(2, 3)  # (B, Hkv, n, G*T, C): one product per key chunk
    values = _as(v, wide).view(B, Hkv, n, KEY_CHUNK, D)  # (B, Hkv, n, C, D)
    y = torch.matmul(_at_least_rows(probs, MIN_ROWS), values)[..., :M, :].sum(2)  # (B, Hkv, G*T, D)
    return _as(y.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D), v.dtype)  # (B, T, H*D)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`; a no-op conversion is skipped here, where it would still cost a dispatch."""
    return x if x.dtype == dtype else x.to(dtype)


def _at_least_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(..., M, K) -> (..., max(M, rows), K), the extra rows copies of the first."""
    missing = rows - x.shape[-2]
    if missing <= 0:
        return x
    return torch.cat([x, x[..., :1, :].expand(*x.shape[:-2], missing, x.shape[-1])], dim=-2)


def _pad_keys(k, v, bias, extra: int):
    """Append `extra` unseen keys (zeros, bias -inf) so the span is a whole number of chunks."""
    B, _, S, _ = k.shape
    if bias is None:
        bias = torch.zeros(B, 1, 1, 1, S, device=k.device)
    bias = F.pad(bias, (0, extra), value=float("-inf"))
    return F.pad(k, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra)), bias


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool) -> torch.Tensor:
    """The same contract for forwards with gradients: q (B, T, H, D) -> (B, T, H*D); with
    is_causal, SDPA applies the causal mask itself and `mask` is not needed."""
    B, T, H, D = q.shape
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=None if is_causal else mask, is_causal=is_causal,
                                       enable_gqa=H != k.shape[1])  # (B, H, T, D)
    return y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
