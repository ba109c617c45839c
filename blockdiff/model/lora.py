"""Linear layers with an optional LoRA draft adapter that is gated per token.

The draft adapter is switched on only for draft (MASK) tokens: `gate` is a (B, T, 1)
tensor of 0/1, or None when no token of the forward uses it. The AR path (gate None or 0)
is therefore exactly the base model, which keeps speculative decoding lossless.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdaptableLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_scale = 0.0

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

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if gate is None or self.lora_A is None:
            return y
        delta = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scale
        return y + delta * gate
