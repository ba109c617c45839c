"""Weight-only int4 quantization for CPU inference, through ATen's own kernel
(`_weight_int4pack_mm_for_cpu`).

Each output row's input channels form groups of GROUP_SIZE that share a scale and a zero
point, w = (q - 8) * scale + zero with q in 0..15: GGUF's Q4_1 layout (w = q * d + m, groups
of 32) re-expressed, so a Q4_1 model re-quantized here keeps its own groups. Rounding is to
nearest from each group's min and max. Activations stay in the model's dtype.

The kernel computes each row of the input on its own, so a row's result does not depend on
how many rows share the product (tests/test_quantize.py): quantized ar and spec modes stay
token-identical. It reads a quarter of bf16's bytes, which pays where a product is
bandwidth-bound (a few rows); its cost grows with the rows, so wide products (spec verify
passes, big batches) are slower than bf16 (benchmarks/RESULTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZE = 32
QUANTIZATIONS = ("none", "int4")
QUANTIZATION_CHOICES = ("auto", *QUANTIZATIONS)  # auto: measured at load (model/autotune.py)
QUANTIZATION_HELP = ("weight-only quantization of the products (int4: groups of 32, CPU only; auto: the "
                     "fastest at the widths the auto modes run, measured when the model loads)")


@dataclass
class Int4Weight:
    packed: torch.Tensor  # the kernel's layout of the (out, in) 4-bit codes
    scales_and_zeros: torch.Tensor  # (in / GROUP_SIZE, out, 2) in the activation dtype
    out_features: int

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, in) -> (n, out)."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), self.packed, GROUP_SIZE,
                                                          self.scales_and_zeros)


def supports_int4(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.shape[0] % 16 == 0
            and weight.shape[1] % GROUP_SIZE == 0 and weight.dtype in (torch.bfloat16, torch.float32))


def quantize_int4(weight: torch.Tensor) -> Int4Weight:
    """(out, in) float weight -> Int4Weight, groups of GROUP_SIZE along `in`."""
    if not supports_int4(weight):
        raise ValueError(f"int4 needs a bf16 or float32 CPU weight whose output size is a multiple of 16 "
                         f"and input size a multiple of {GROUP_SIZE}; got {tuple(weight.shape)} {weight.dtype} on {weight.device}")
    out, inp = weight.shape
    groups = weight.detach().float().reshape(out, inp // GROUP_SIZE, GROUP_SIZE)  # (out, G, 32)
    low, high = groups.amin(-1), groups.amax(-1)  # (out, G)
    scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)  # (out, G)
    codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)  # (out, G, 32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.reshape(out, inp).to(torch.int32), 1)
    zero = low + 8 * scale  # (out, G): the kernel subtracts 8 from each code
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (G, out, 2)
    return Int4Weight(packed, scales_and_zeros.to(weight.dtype), out)


def dequantize_int4(weight: Int4Weight, in_features: int) -> torch.Tensor:
    """The (out, in) float32 weight the kernel multiplies by (for tests and error reports)."""
    eye = torch.eye(in_features, dtype=weight.scales_and_zeros.dtype)  # (in, in)
    return weight(eye).float().T  # (out, in)
