"""Linear layers with an optional LoRA draft adapter that is gated per token.

The draft adapter is switched on only for draft (MASK) tokens: `gate` is a (B, T, 1)
tensor of 0/1, or None when no token of the forward uses it. The AR path (gate None or 0)
is therefore exactly the base model, which keeps speculative decoding lossless.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blockdiff.model.cpu_kernels import Bf16TileWeight, bf16_tile_weight
from blockdiff.model.quantize import QuantizedWeight, quantized

# what a linear multiplies by at inference: oneDNN's packed copy, a weight for one of blockdiff's
# or ATen's own kernels (quantized, or bf16 in AMX tiles), or the plain weight
KernelWeight = QuantizedWeight | Bf16TileWeight
InferenceWeight = torch.Tensor | KernelWeight | None


def pack_for_cpu(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked layout of a bf16 or float32 CPU weight, or None where it does not apply.

    Products with it run faster than F.linear on the plain layout and, unlike float32
    F.linear (MKL), give a row the same result whatever the other rows (see `linear`).
    """
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32) \
            or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    except (RuntimeError, AttributeError):
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def inference_weight(weight: torch.Tensor, quantization: str = "none") -> InferenceWeight:
    """The copy of `weight` inference multiplies by: the quantized weight (model/quantize.py) when
    asked for and the weight allows, else a bf16 weight in AMX tiles (model/cpu_bf16.c) where
    the CPU has them, else oneDNN's packed layout where it applies, else None."""
    packed = quantized(weight, quantization)
    if packed is None:
        packed = bf16_tile_weight(weight)
    return packed if packed is not None else pack_for_cpu(weight)


# the widest product computed in one call; wider inputs run as chunks of this many rows
MAX_PRODUCT_ROWS = 128


def linear(x: torch.Tensor, weight: torch.Tensor | None, packed: InferenceWeight) -> torch.Tensor:
    """x @ weight.T through the packed copy when there is one, each row summed in the same
    order whatever the number of rows.

    GEMM libraries pick kernels by the row count, and some sum in another order: a single
    row takes a matrix-vector kernel (on an AVX512-BF16 EPYC, 26 of 147,456 outputs of
    SmolLM2's down_proj differed between one row and the same row among others), and on an
    AMX Xeon oneDNN splits down_proj's products differently at some widths between 150 and
    256 rows. So a lone row is computed as one of two identical rows, and a packed product of
    more than MAX_PRODUCT_ROWS rows as chunks of at most that many (both nearly free: a product's cost
    is reading the weight, which stays in cache across chunks). tests/test_width_invariance.py
    checks every width up to 320 rows.
    """
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    # only the packed (inference) products are chunked: training's unpacked ones keep one call
    if packed is None or rows.shape[0] <= MAX_PRODUCT_ROWS:
        y = _product(rows, weight, packed)  # (N, out)
    else:
        y = torch.cat([_product(chunk, weight, packed) for chunk in rows.split(MAX_PRODUCT_ROWS)])  # (N, out)
    return y.reshape(*x.shape[:-1], y.shape[-1])  # (..., out)


def _product(rows: torch.Tensor, weight: torch.Tensor | None, packed: InferenceWeight) -> torch.Tensor:
    """(n, in) -> (n, out); one row is computed as two, except by the kernels that keep rows
    apart themselves (model/quantize.py, model/cpu_bf16.c)."""
    if isinstance(packed, KernelWeight):
        return packed(rows)
    n = rows.shape[0]
    if n == 1:
        rows = rows.expand(2, -1)  # (2, in)
    y = packed_linear(rows, packed) if packed is not None else F.linear(rows, weight)  # (n or 2, out)
    return y[:1] if n == 1 else y


class AdaptableLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_scale = 0.0
        self.packed: InferenceWeight = None  # inference-only copy of weight; see inference_weight

    def pack(self, quantization: str = "none") -> None:
        self.packed = inference_weight(self.weight, quantization)

    def attach_lora(self, rank: int, alpha: float, A: torch.Tensor | None = None, B: torch.Tensor | None = None):
        """A: (rank, in), B: (out, rank); fresh B is zero so a new adapter starts as a no-op."""
        w = self.weight
        A = torch.empty(rank, self.in_features).normal_(std=rank ** -0.5) if A is None else A
        B = torch.zeros(self.out_features, rank) if B is None else B
        if A.shape != (rank, self.in_features) or B.shape != (self.out_features, rank):
            raise ValueError(f"LoRA shapes {tuple(A.shape)}, {tuple(B.shape)} do not fit a "
                             f"{self.in_features}->{self.out_features} layer with rank {rank}")
        self.lora_A = nn.Parameter(A.to(w.device, w.dtype))
        self.lora_B = nn.Parameter(B.to(w.device, w.dtype))
        self.lora_scale = alpha / rank

    def lora_delta(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to this layer's output, zero where gate is 0."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * (self.lora_scale * gate)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        y = linear(x, self.weight, self.packed)
        if gate is None or self.lora_A is None:
            return y
        return y + self.lora_delta(x, gate)


class FusedLinear:
    """Linears that read the same input (q/k/v, gate/up) as one matrix product, for inference.

    The concatenated weight is a copy, built by `Transformer.prepare_for_inference`; each
    part's adapter, attached before or after, still adds to its own output columns only.
    """

    def __init__(self, parts: list[AdaptableLinear], quantization: str = "none"):
        self.parts = parts
        self.weight = torch.cat([p.weight.detach() for p in parts])  # (sum of outs, in)
        self.packed = inference_weight(self.weight, quantization)
        if self.packed is not None:
            self.weight = None  # the packed copy is the only one used
        ends = torch.tensor([p.out_features for p in parts]).cumsum(0).tolist()
        self.columns = list(zip([0, *ends[:-1]], ends))

    def __call__(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        y = linear(x, self.weight, self.packed)  # (B, T, sum of outs)
        if gate is not None:
            for part, (lo, hi) in zip(self.parts, self.columns):
                if part.lora_A is not None:
                    y[..., lo:hi] += part.lora_delta(x, gate)
        return y
