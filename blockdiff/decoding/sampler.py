"""The batched sampling stage every decoder uses: one pass over a batch's logits, whatever
mix of greedy and sampled rows it holds.

A sampled row keeps its own CPU generator, so its tokens do not depend on which sequences
share its batch; the generator only draws the row's float64 uniform noise, in the order the
row would draw it alone (`uniform_noise`). Everything else (filters, softmax, the Gumbel
argmax, verify's rejection rule) runs once for the whole batch on the model's device, and
the picks reach the host in one copy: per-row sampling would sync a GPU once per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blockdiff.sampling import SamplingParams, probabilities


@dataclass
class Picks:
    tokens: torch.Tensor  # (B, K) on the host
    confidence: torch.Tensor  # (B, K) on the host: each pick's probability under its row's distribution
    probs: torch.Tensor  # (B, K, V) float64 on the device: each row's sampling distribution


def uniform_noise(generators: list[torch.Generator | None], shape: tuple[int, ...], device: torch.device,
                  drawn: torch.Tensor | None = None) -> torch.Tensor:
    """(B, *shape) float64 uniforms on `device`; row b drawn from generators[b] on the host (zeros
    for a row without one). With `drawn` (B, shape[0]) bool, a row draws only its drawn slots, as
    one (n, *shape[1:]) draw, so it consumes its generator as it would sampling those alone."""
    noise = torch.zeros(len(generators), *shape, dtype=torch.float64)  # (B, *shape)
    for row, generator in enumerate(generators):
        if generator is None:
            continue
        if drawn is None:
            noise[row] = torch.rand(shape, dtype=torch.float64, generator=generator)
        else:
            slots = drawn[row].nonzero()[:, 0]
            noise[row, slots] = torch.rand((len(slots), *shape[1:]), dtype=torch.float64, generator=generator)
    return noise.to(device)


def gumbel_argmax(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(..., V) float64 probs and uniforms of the same shape -> (...) the Gumbel-max sample (in
    float64: low precision biases diffusion's confident picks)."""
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return (probs.log() + gumbel).argmax(-1)


def row_probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """(B, K, V) logits -> (B, K, V) float64: each sampled row's distribution after its own
    temperature and filters (`sampling.probabilities`, one call per distinct setting), each
    greedy row's plain softmax (its confidence in diffusion)."""
    probs = torch.empty(logits.shape, dtype=torch.float64, device=logits.device)
    groups: dict[tuple, list[int]] = {}
    for row, p in enumerate(params):
        key = None if p.greedy else (p.temperature, p.top_k, p.top_p, p.min_p)
        groups.setdefault(key, []).append(row)
    for key, rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        if key is None:
            probs[index] = torch.softmax(logits[index].float(), dim=-1).double()
        else:
            probs[index] = probabilities(logits[index], params[rows[0]])
    return probs


def pick(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
         drawn: torch.Tensor | None = None) -> Picks:
    """(B, K, V) logits -> one token per slot: the argmax for greedy rows, a Gumbel-max sample
    for the others. `drawn` (B, K) bool marks the slots whose picks are used (see
    `uniform_noise`); the others are computed and not meant to be read."""
    tokens, confidence, probs = pick_on_device(logits, params, generators, drawn)
    both = torch.stack([tokens.double(), confidence]).cpu()  # (2, B, K): one host copy
    return Picks(both[0].long(), both[1], probs)


def pick_on_device(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                   drawn: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pick`'s work, all on the logits' device: tokens (B, K), confidence (B, K), probs (B, K, V)."""
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)[:, None]  # (B, 1)
    probs = row_probabilities(logits, params)  # (B, K, V)
    sampled_generators = [None if p.greedy else g for p, g in zip(params, generators)]
    noise = uniform_noise(sampled_generators, tuple(logits.shape[1:]), logits.device, drawn)  # (B, K, V)
    tokens = torch.where(greedy, logits.argmax(-1), gumbel_argmax(probs, noise))  # (B, K)
    return tokens, probs.gather(-1, tokens[..., None])[..., 0], probs
