"""Log-probabilities of emitted (and prompt) tokens under the AR model.

Every lossless mode decides its tokens from causal logits: `ar` from its 1-token pass, the
spec modes from their verify pass, every mode's first token from the prefill. Those logits
are the AR model's prediction for the slot (the forwards are width-invariant), so the
numbers are the same in every lossless mode. They are the raw model's: log-softmax of the
logits before temperature, top-k or top-p (vLLM's default, "raw_logprobs"). `diffusion`
commits tokens no causal pass scored and has none (SamplingParams refuses the request).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # alternatives per token, as in OpenAI's API


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the `k` most likely (id, logprob), most likely first


def score(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """(T, V) logits of the slots of `tokens` (T,) -> each token's logprob and its top `k`."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]  # (T,)
    top = torch.topk(logprobs, k, dim=-1)  # (T, k); k may be 0
    return [TokenLogprob(t, lp, tuple(zip(ids, values))) for t, lp, ids, values
            in zip(tokens, chosen.cpu().tolist(), top.indices.cpu().tolist(), top.values.cpu().tolist())]
