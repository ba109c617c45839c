"""What `quantization="auto"` means on this machine: the weight format in which the model is
expected to decode fastest, measured when the model loads.

One format serves every width: a row's logits must not depend on its forward's width, or the
spec modes would stop equalling `ar`, so a model cannot read int4 weights for one-token steps
and float ones for verify passes. Which format wins depends on the hardware and on the widths:
int4 reads a quarter of bf16's bytes, which pays in one-token steps on an AMX Xeon, and
computes more per row, which loses in wide passes and everywhere on an AVX2 CPU; fp16
weights (float32 models only) halve float32's bytes through fbgemm, which pays on AVX2 CPUs
up to a few dozen rows (benchmarks/RESULTS.md). And the widths depend on the format: each spec
mode's block length is chosen from the same timings (engine/block_lengths.py), shorter where
wide forwards are dear. So each format is timed and scored by the caller's estimate of its
decode rate (the fastest of `auto`'s modes at their best block lengths), as vLLM and
llama.cpp tune kernels, not guessed.
"""
from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

from blockdiff.model.kv_cache import KVCache
from blockdiff.model.quantize import QUANTIZATIONS, unavailable
from blockdiff.model.transformer import Transformer

CONTEXT = 64  # cached tokens each timed forward attends over


def forward_width(mode: str, block_length: int) -> int:
    """Tokens per sequence in a decode forward of `mode`: a one-token AR step, a block, or
    quad_spec's anchors and their L sub-blocks."""
    return {"ar": 1, "quad_spec": block_length + block_length ** 2}.get(mode, block_length)


@torch.inference_mode()
def forward_seconds(model: Transformer, width: int, repeats: int, batch: int = 1, drafting: bool = False) -> float:
    """Median seconds of a decode forward of `batch` sequences: `width` tokens each over CONTEXT
    cached ones through the layers, and every row through the output head (the largest
    product); `drafting`: through the draft adapter too, as a spec mode's draft pass runs. The
    cached keys and values are zeros: what they hold does not change the work, and a prefill
    per width would cost more than the timing where wide products are slow (int4 on AVX2)."""
    cache = KVCache(model.config, batch, CONTEXT + width, model.dtype, model.device)
    cache.advance(CONTEXT)
    tokens = torch.randint(0, model.config.vocab_size, (batch, width), device=model.device)
    gate = torch.ones(batch, width, dtype=torch.bool, device=model.device) if drafting else None
    times = []
    for _ in range(repeats + 1):  # the first warms up the kernels' caches
        started = time.perf_counter()
        model.logits(model(tokens, None, cache, "causal", adapter_gate=gate))
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


Seconds = Callable[..., float]  # seconds(width, batch=1, drafting=False): one decode forward, as forward_seconds


def forward_timer(model: Transformer, repeats: int = 3) -> Seconds:
    """`forward_seconds` of the model as it is prepared now, each (width, batch, drafting) timed once."""
    timed = functools.cache(lambda width, batch, drafting: forward_seconds(model, width, repeats, batch, drafting))
    return lambda width, batch=1, drafting=False: timed(width, batch, drafting)


def choose_quantization(model: Transformer, rate: Callable[[Seconds], float], most_tokens_per_forward: float = 1.0,
                        repeats: int = 3) -> tuple[str, dict[str, float], Seconds]:
    """Prepare the model with the format of the highest `rate(seconds)`, the expected tokens
    per second given that format's forward timings, among the formats that can serve the model
    (off the CPU, only "none"; fp16 for float32 models).
    -> (its name, {format: expected tokens per second}, its timings for reuse).

    No decode commits more than `most_tokens_per_forward` tokens per one-token forward's time
    (a wider forward costs no less). So every format's one-token forward is timed first, the
    formats are scored in the order of that bound, and one whose bound is below the best score
    so far is not timed further (int4 on an AVX2 CPU, whose wide forwards take seconds) and is
    reported with its bound."""
    candidates = [q for q in QUANTIZATIONS if unavailable(q, model.dtype, model.device) is None]
    timers, bounds = {}, {}
    for quantization in candidates:
        model.prepare_for_inference(quantization)
        timers[quantization] = forward_timer(model, repeats)
        bounds[quantization] = most_tokens_per_forward / timers[quantization](1)
    rates = {}
    for quantization in sorted(candidates, key=bounds.get, reverse=True):
        if bounds[quantization] < max(rates.values(), default=0.0):
            rates[quantization] = bounds[quantization]
            continue
        if model.quantization != quantization:
            model.prepare_for_inference(quantization)
        rates[quantization] = rate(timers[quantization])
    best = max(rates, key=rates.get)
    if model.quantization != best:
        model.prepare_for_inference(best)
    return best, rates, timers[best]
