"""Quality of generated text: its negative log-likelihood under the model's own AR (causal) pass.

A faster mode is only worth it if its text is as likely under the AR model as `ar`'s own
output; at temperature 0 the spec modes give the same tokens, so the same perplexity, while
diffusion at a low threshold trades perplexity for tokens per forward.
"""
from __future__ import annotations

import torch

from blockdiff.bench.results import Sample
from blockdiff.model.transformer import Transformer


@torch.inference_mode()
def output_nll(model: Transformer, prompt_ids: list[int], output_ids: list[int]) -> float:
    """Summed nats of output_ids given prompt_ids, teacher-forced in one causal forward.

    No cache and no adapter gate: this is exactly the base (AR) model, even when a draft
    adapter is loaded, so every mode is judged by the same scorer.
    """
    if not output_ids:
        return 0.0
    ids = torch.tensor([prompt_ids + output_ids], device=model.device)  # (1, P+N)
    hidden = model(ids[:, :-1], pattern="causal")  # (1, P+N-1, hidden): row t predicts token t+1
    start = len(prompt_ids) - 1  # the row that predicts the first output token
    logits = model.logits(hidden[0, start:])  # (N, vocab), float32
    targets = ids[0, len(prompt_ids):]  # (N,)
    logp = torch.log_softmax(logits, dim=-1)  # (N, vocab)
    return float(-logp.gather(1, targets[:, None]).sum())  # (N, 1) -> scalar


def score_samples(model: Transformer, prompts: list[list[int]], samples: list[Sample]) -> None:
    """Set each sample's nll in place (samples[i] answers prompts[i])."""
    for ids, sample in zip(prompts, samples):
        sample.nll = output_nll(model, ids, sample.token_ids)
