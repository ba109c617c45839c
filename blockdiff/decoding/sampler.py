"""The batched sampling stage every decoder uses: one pass over a batch's logits, whatever
mix of greedy and sampled rows it holds.

A sampled row keeps its own CPU generator, so its tokens do not depend on which sequences
share its batch; the generator only draws the row's float64 uniform noise, in the order the
row would draw it alone (`uniform_noise`). Everything else (filters, softmax, the Gumbel
argmax, verify's rejection rule) is tensor work on the model's device, over the whole batch
at once on an accelerator and a row at a time on the CPU (`row_chunks`), and the picks reach
the host in one copy a step: per-row sampling with host reads would sync a GPU once per
sequence.
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
    noise = torch.empty(len(generators), *shape, dtype=torch.float64)  # (B, *shape)
    for row, generator in enumerate(generators):
        if generator is None:
            noise[row] = 0.0
        elif drawn is None:
            torch.rand(shape, dtype=torch.float64, generator=generator, out=noise[row])
        else:
            slots = drawn[row].nonzero()[:, 0]
            noise[row] = 0.0
            noise[row, slots] = torch.rand((len(slots), *shape[1:]), dtype=torch.float64, generator=generator)
    return noise.to(device)


def gumbel_argmax(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(..., V) float64 probs and uniforms of the same shape -> (...) the Gumbel-max sample (in
    float64: low precision biases diffusion's confident picks)."""
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return (probs.log() + gumbel).argmax(-1)


def row_probabilities(logits: torch.Tensor, params: list[SamplingParams], out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, V) logits -> (B, K, V) float64 (into `out` when given): each sampled row's
    distribution after its own temperature and filters (`sampling.probabilities`, one call per
    distinct setting), each greedy row's plain softmax (its confidence in diffusion)."""
    out = torch.empty(logits.shape, dtype=torch.float64, device=logits.device) if out is None else out
    groups: dict[tuple, list[int]] = {}
    for row, p in enumerate(params):
        key = None if p.greedy else (p.temperature, p.top_k, p.top_p, p.min_p)
        groups.setdefault(key, []).append(row)
    for key, rows in groups.items():
        index = slice(None) if len(rows) == len(params) else torch.tensor(rows, device=logits.device)
        if key is None:
            out[index] = torch.softmax(logits[index].float(), dim=-1)
        else:
            out[index] = probabilities(logits[index], params[rows[0]])
    return out


def row_chunks(batch_size: int, device: torch.device) -> list[slice]:
    """The rows the device stage takes at once: the whole batch on an accelerator, so each op
    is one launch; one row on the CPU, where a row's (K, V) float64 intermediates stay in
    cache while a whole batch's would stream through memory once per op (several times
    slower at batch 16 with SmolLM2's vocabulary)."""
    size = batch_size if device.type != "cpu" else 1
    return [slice(start, start + size) for start in range(0, batch_size, size)]


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
    B, K, _ = logits.shape
    tokens = torch.empty(B, K, dtype=torch.long, device=logits.device)
    probs = torch.empty(logits.shape, dtype=torch.float64, device=logits.device)
    for rows in row_chunks(B, logits.device):
        tokens[rows] = _pick_rows(logits[rows], params[rows], generators[rows],
                                  None if drawn is None else drawn[rows], probs[rows])
    return tokens, probs.gather(-1, tokens[..., None])[..., 0], probs


def _pick_rows(logits, params, generators, drawn, probs) -> torch.Tensor:
    """Tokens (b, K) for a chunk of rows; their distributions are written into probs (b, K, V)."""
    row_probabilities(logits, params, out=probs)
    if all(p.greedy for p in params):
        return logits.argmax(-1)
    sampled_generators = [None if p.greedy else g for p, g in zip(params, generators)]
    noise = uniform_noise(sampled_generators, tuple(logits.shape[1:]), logits.device, drawn)  # (b, K, V)
    tokens = gumbel_argmax(probs, noise)  # (b, K)
    if not any(p.greedy for p in params):
        return tokens
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)[:, None]  # (b, 1)
    return torch.where(greedy, logits.argmax(-1), tokens)
