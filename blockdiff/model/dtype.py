"""The floating-point type a model runs in, and what `auto` means on this hardware.

bf16 halves the bytes a decode step reads, but only hardware that multiplies bf16 natively
(CPUs with AVX-512-BF16 or AMX, current GPUs) gains from it. Elsewhere PyTorch falls back to
a reference GEMM: on a 2-core AVX2 EPYC a 32-token forward of SmolLM2-135M took 558 ms in
bf16 against 144 ms in float32 (the 1-token step was 40 vs 61 ms). `auto` therefore means
bf16 where it is native and float32 where it is not, as vLLM's CPU backend does.
"""
from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether matrix products in bf16 run on native hardware on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """`name` ("auto" or one of DTYPES) as a torch dtype for `device`."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)
