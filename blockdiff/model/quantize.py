"""Quantized formats for CPU inference: weight-only int4 and int8 through ATen's own kernels
(`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`), fp16 through fbgemm's
(`quantized::linear_dynamic_fp16`), and w4a8 (int4 weights, int8 activations) through
blockdiff's own kernel (model/cpu_w4a8.c).

Each output row's input channels form groups of GROUP_SIZE that share a scale and a zero
point, w = (q - 8) * scale + zero with q in 0..15: GGUF's Q4_1 layout (w = q * d + m, groups
of 32) re-expressed, so a Q4_1 model re-quantized here keeps its own groups. Rounding is to
nearest from each group's min and max. Activations stay in the model's dtype.

int8 keeps one scale per output channel, w = q * scale with q in -127..127: twice int4's
bytes, closer to the float weights.

The int4 and int8 kernels compute each row of the input on its own, so a row's result does not
depend on how many rows share the product (tests/test_quantize.py): quantized ar and spec modes
stay token-identical. int4 reads a quarter of bf16's bytes, which pays where a product is
bandwidth-bound (a few rows); its cost grows with the rows, so wide products (spec verify
passes, big batches) are slower than bf16 (benchmarks/RESULTS.md). int8 sits between them.

fp16 stores a float32 model's weights in half precision and widens them in registers, the
sums in float32: half the bytes of float32 on CPUs without native bf16 (AVX2), where
fbgemm's kernel reads them at close to memory speed. That kernel computes blocks of up to six
rows, and its one- and two-row blocks sum in another order, so a product whose row count is 1
or 2 more than a multiple of six is padded with zero rows (`Fp16Weight`; on AVX-512 its rows
are independent without it).

w4a8 stores the weights as llama.cpp's Q4_1 does (codes 0..15 in groups of 32, w = q * d + m
with d and m in float16) and multiplies them as llama.cpp does, by activations quantized to
int8 in groups of 32 (Q8_1): the sums over a group are exact integer dot products (AVX-512
VNNI or AVX2), so the rows are independent by construction and a one-token product reads
little more than the weights' bytes, while wide products cost far less than int4's. The
activations' rounding makes it the least exact format (about 0.5% of a product's scale).

Kernels are chosen by the CPU's instruction set, so every format's rows are checked on the
machine before it is used (`rows_are_independent`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from blockdiff.model import cpu_kernels

GROUP_SIZE = 32
QUANTIZATIONS = ("none", "int4", "int8", "fp16", "w4a8")
QUANTIZATION_CHOICES = ("auto", *QUANTIZATIONS)  # auto: measured at load (model/autotune.py)
QUANTIZATION_HELP = ("quantization of the products, CPU only (int4: weights in groups of 32; int8: weights per output "
                     "channel; fp16: half-precision weights of a float32 model; w4a8: int4 weights and int8 "
                     "activations in groups of 32, llama.cpp's Q4_1 arithmetic; auto: the format in which the auto "
                     "modes are expected to decode fastest, measured when the model loads)")
FP16_BLOCK_ROWS = 6  # fbgemm's widest row block on AVX2
# the model dtypes each format serves (its activations' dtype)
FORMAT_DTYPES = {"int4": (torch.bfloat16, torch.float32), "int8": (torch.bfloat16, torch.float32),
                 "fp16": (torch.float32,), "w4a8": (torch.bfloat16, torch.float32)}


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
            and weight.shape[1] % GROUP_SIZE == 0 and weight.dtype in FORMAT_DTYPES["int4"])


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


@dataclass
class Int8Weight:
    codes: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out,) in the activation dtype

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, in) -> (n, out)."""
        return torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.codes, self.scales)


def supports_int8(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in FORMAT_DTYPES["int8"]


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """(out, in) float weight -> Int8Weight: each output channel scaled so its largest magnitude is 127."""
    if not supports_int8(weight):
        raise ValueError(f"int8 needs a bf16 or float32 CPU weight; got {tuple(weight.shape)} {weight.dtype} "
                         f"on {weight.device}")
    w = weight.detach().float()
    scales = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (out,)
    codes = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)  # (out, in)
    return Int8Weight(codes, scales.to(weight.dtype))


@dataclass
class Fp16Weight:
    packed: object  # fbgemm's packed fp16 copy (a LinearPackedParamsBase)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, in) float32 -> (n, out) float32, each row summed as in a block of three to six."""
        n = rows.shape[0]
        short = n % FP16_BLOCK_ROWS
        if short in (1, 2):  # the last block would be a one- or two-row block: make it three
            rows = torch.nn.functional.pad(rows, (0, 0, 0, 3 - short))  # (n + 3 - short, in), zero rows
        y = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)  # (n or more, out)
        return y[:n] if short in (1, 2) else y


def supports_fp16(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in FORMAT_DTYPES["fp16"]
            and "fbgemm" in torch.backends.quantized.supported_engines)


def quantize_fp16(weight: torch.Tensor) -> Fp16Weight:
    """(out, in) float32 weight -> Fp16Weight (values rounded to half precision; saturating)."""
    if not supports_fp16(weight):
        raise ValueError(f"fp16 weights need a float32 CPU weight and fbgemm; got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    return Fp16Weight(torch.ops.quantized.linear_prepack_fp16(weight.detach(), None))


@dataclass
class W4A8Weight:
    codes: torch.Tensor  # (out/16, in/32, 4, 16, 4) uint8: cpu_w4a8.c's tiles, two codes a byte
    steps: torch.Tensor  # (out/16, in/32, 16) float16: d of w = q * d + m, per output and group
    minimums: torch.Tensor  # (out/16, in/32, 16) float16: m
    out_features: int

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, in) -> (n, out)."""
        return cpu_kernels.w4a8_linear(rows, self.codes, self.steps, self.minimums, self.out_features)


def supports_w4a8(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.shape[0] % 16 == 0
            and weight.shape[1] % GROUP_SIZE == 0 and weight.dtype in FORMAT_DTYPES["w4a8"] and cpu_kernels.available())


def quantize_w4a8(weight: torch.Tensor) -> W4A8Weight:
    """(out, in) float weight -> W4A8Weight: Q4_1's groups, codes rounded to nearest from the
    group's minimum in steps of (max - min) / 15, both as float16 holds them."""
    if not supports_w4a8(weight):
        raise ValueError(f"w4a8 needs the fused CPU kernels and a bf16 or float32 CPU weight whose output size is a "
                         f"multiple of 16 and input size a multiple of {GROUP_SIZE}; got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    out, inp = weight.shape
    groups = weight.detach().float().reshape(out, inp // GROUP_SIZE, GROUP_SIZE)  # (out, G, 32)
    low, high = groups.amin(-1), groups.amax(-1)  # (out, G)
    minimums = low.half()
    steps = ((high - low) / 15).half().clamp_min(torch.finfo(torch.float16).smallest_normal * 2 ** -10)  # (out, G)
    if not (bool(steps.isfinite().all()) and bool(minimums.isfinite().all())):
        raise ValueError("w4a8 keeps each group's step and minimum in float16, and this weight's exceed its range")
    codes = ((groups - minimums.float()[..., None]) / steps.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    # each tile of 16 outputs, each group: 4 chunks of inputs 8c..8c+7, output j's 4 bytes holding
    # inputs 8c+i (low nibble) and 8c+4+i (high nibble)
    split = codes.reshape(out // 16, 16, inp // GROUP_SIZE, 4, 2, 4)  # (tile, j, group, c, nibble, i)
    split = split.permute(0, 2, 3, 1, 5, 4)  # (tile, group, c, j, i, nibble)
    packed = (split[..., 0] | split[..., 1] << 4).contiguous()  # (tile, group, c, j, i)

    def tiled(values: torch.Tensor) -> torch.Tensor:  # (out, G) -> (out/16, G, 16)
        return values.reshape(out // 16, 16, -1).transpose(1, 2).contiguous()

    return W4A8Weight(packed, tiled(steps), tiled(minimums), out)


QuantizedWeight = Int4Weight | Int8Weight | Fp16Weight | W4A8Weight
FORMATS = {"int4": (supports_int4, quantize_int4), "int8": (supports_int8, quantize_int8),
           "fp16": (supports_fp16, quantize_fp16), "w4a8": (supports_w4a8, quantize_w4a8)}


def quantized(weight: torch.Tensor, quantization: str) -> QuantizedWeight | None:
    """`weight` in the format, or None for "none" or a weight the format cannot take (its shape)."""
    if quantization == "none":
        return None
    supports, quantize = FORMATS[quantization]
    return quantize(weight) if supports(weight) else None


@functools.cache
def rows_are_independent(quantization: str, dtype: torch.dtype) -> bool:
    """Whether, on this CPU, a row of the format's product is the same whatever the number of
    rows and its place among them (kernels are picked by the CPU's instruction set): widths
    up to four of fbgemm's 6-row blocks and past them, at three offsets."""
    generator = torch.Generator().manual_seed(0)
    weight = quantized((torch.randn(192, 320, generator=generator) * 0.05).to(dtype), quantization)
    x = torch.randn(4 * FP16_BLOCK_ROWS + 40, 320, generator=generator).to(dtype)
    return cpu_kernels.same_rows_at_every_width(weight, x, range(1, 4 * FP16_BLOCK_ROWS + 3))


def unavailable(quantization: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why `quantization` cannot serve a model of this dtype on this device, or None if it can."""
    if quantization == "none":
        return None
    if device.type != "cpu":
        return f"quantization {quantization!r} runs on the CPU only (ATen's, fbgemm's and blockdiff's CPU kernels)"
    if dtype not in FORMAT_DTYPES[quantization]:
        serves = " and ".join(str(d).removeprefix("torch.") for d in FORMAT_DTYPES[quantization])
        return f"{quantization} weights serve {serves} models; this one is {dtype}"
    if quantization == "fp16" and "fbgemm" not in torch.backends.quantized.supported_engines:
        return "fp16 weights need fbgemm, which this PyTorch build lacks"
    if quantization == "w4a8" and not cpu_kernels.available():
        return "w4a8 runs on blockdiff's fused CPU kernels, which this machine cannot build (an x86-64 CPU with AVX2 and FMA and a C compiler)"
    if not rows_are_independent(quantization, dtype):
        return (f"the {quantization} kernel on this CPU gives a row another result beside other rows: the spec "
                "modes would stop equalling ar")
    return None


def dequantize_int4(weight: Int4Weight, in_features: int) -> torch.Tensor:
    """The (out, in) float32 weight the kernel multiplies by (for tests and error reports)."""
    eye = torch.eye(in_features, dtype=weight.scales_and_zeros.dtype)  # (in, in)
    return weight(eye).float().T  # (out, in)
