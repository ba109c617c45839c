"""A sampler head: dependence between the slots of a parallel draft, at the cost of an MLP.

A draft pass predicts every slot of a block at once, so slot s knows nothing of the token
drafted at slot s-1 (its marginal over what might come first is all it has). The sampler head
(Apple, arXiv 2507.11851) restores that dependence cheaply: walking the block left to right,

    z_s = h_s + up(silu(down([norm(h_s) ; norm(embed(token before s))])))

and the draft at slot s is the best of the draft pass's top-k candidates for s scored against
z_s through the LM head. `up` starts at zero, so an untrained head drafts exactly what the pass
alone drafts. It reads only draft-pass states and never touches the AR path: a spec mode's
output is the verifier's whatever the head drafts (lossless at temperature 0).

Stored beside the LoRA in the adapter directory as sampler_head.safetensors (tensors
norm_hidden (H,), norm_token (H,), down.weight (inner, 2H), up.weight (H, inner))
and `"blockdiff_sampler_head": {"inner_size": I, "top_k": K}` in adapter_config.json.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SamplerHead(nn.Module):
    def __init__(self, hidden_size: int, inner_size: int, top_k: int, eps: float = 1e-5):
        super().__init__()
        if inner_size <= 0 or top_k <= 0:
            raise ValueError(f"sampler head: inner_size and top_k must be positive, got {inner_size}, {top_k}")
        self.top_k, self.eps = top_k, eps
        self.norm_hidden = nn.Parameter(torch.ones(hidden_size))
        self.norm_token = nn.Parameter(torch.ones(hidden_size))
        self.down = nn.Linear(2 * hidden_size, inner_size, bias=False)
        self.up = nn.Linear(inner_size, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    @property
    def inner_size(self) -> int:
        return self.down.out_features

    def forward(self, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) draft-pass states, previous (..., H) embeddings of the token before
        each slot -> (..., H) states to score through the LM head."""
        x = torch.cat([F.rms_norm(hidden, hidden.shape[-1:], self.norm_hidden.to(hidden.dtype), self.eps),
                       F.rms_norm(previous, previous.shape[-1:], self.norm_token.to(previous.dtype), self.eps)],
                      dim=-1)  # (..., 2H)
        return hidden + self.up(F.silu(self.down(x.to(self.down.weight.dtype)))).to(hidden.dtype)

    @torch.no_grad()
    def greedy_drafts(self, hidden: torch.Tensor, logits: torch.Tensor, first: torch.Tensor,
                      embed: nn.Embedding, head_weight: torch.Tensor) -> torch.Tensor:
        """hidden (B, K, H) and logits (B, K, V) of K draft slots, first (B,) the token before
        slot 0 -> (B, K) drafts, each slot's pick conditioned on the pick before it."""
        candidates = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices  # (B, K, k)
        previous, drafts = first.to(hidden.device), []
        for s in range(hidden.shape[1]):
            z = self(hidden[:, s], embed(previous))  # (B, H)
            scores = torch.einsum("bh,bkh->bk", z.float(), head_weight[candidates[:, s]].float())  # (B, k)
            previous = candidates[:, s].gather(1, scores.argmax(-1, keepdim=True))[:, 0]  # (B,)
            drafts.append(previous)
        return torch.stack(drafts, dim=1)  # (B, K)
