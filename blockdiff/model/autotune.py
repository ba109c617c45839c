"""What `quantization="auto"` means on this machine: the weight format whose forwards are
fastest at the widths the model will run, measured when the model loads.

One format serves every width: a row's logits must not depend on its forward's width, or the
spec modes would stop equalling `ar`, so a model cannot read int4 weights for one-token steps
and float ones for verify passes. Which format wins depends on the hardware and on the widths:
int4 reads a quarter of bf16's bytes, which pays in one-token steps on an AMX Xeon, and
computes more per row, which loses in wide passes and everywhere on an AVX2 CPU; fp16
weights (float32 models only) halve float32's bytes through fbgemm, which pays on AVX2 CPUs
up to a few dozen rows (benchmarks/RESULTS.md). So the choice is measured, as vLLM and llama.cpp tune kernels, not
guessed: the sum of one forward per width over a short cache, the median of a few repeats.
"""
from __future__ import annotations

import statistics
import time

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
def forward_seconds(model: Transformer, width: int, repeats: int, batch: int = 1) -> float:
    """Median seconds of a decode forward of `batch` sequences: `width` tokens each over CONTEXT
    cached ones through the layers, and every row through the output head (the largest
    product). The cached keys and
    values are zeros: what they hold does not change the work, and a prefill per width would
    cost more than the timing where wide products are slow (int4 on AVX2)."""
    cache = KVCache(model.config, batch, CONTEXT + width, model.dtype, model.device)
    cache.advance(CONTEXT)
    tokens = torch.randint(0, model.config.vocab_size, (batch, width), device=model.device)
    times = []
    for _ in range(repeats + 1):  # the first warms up the kernels' caches
        started = time.perf_counter()
        model.logits(model(tokens, None, cache, "causal"))
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def choose_quantization(model: Transformer, widths: list[int], repeats: int = 3) -> tuple[str, dict[str, float]]:
    """Prepare the model with the format whose forwards at `widths` take the least time in sum;
    -> (its name, {format: seconds}), among the formats that can serve the model (off the CPU,
    only "none"; fp16 for float32 models). A format is dropped as soon as its partial sum passes
    the best complete one, and reported with that partial sum (a lower bound)."""
    candidates = [q for q in QUANTIZATIONS if unavailable(q, model.dtype, model.device) is None]
    seconds = {}
    for quantization in candidates:
        model.prepare_for_inference(quantization)
        best_so_far = min(seconds.values(), default=float("inf"))
        seconds[quantization] = 0.0
        for width in sorted(widths):
            seconds[quantization] += forward_seconds(model, width, repeats)
            if seconds[quantization] > best_so_far:
                break
    best = min(seconds, key=seconds.get)
    if best != candidates[-1]:  # the last one timed is still prepared
        model.prepare_for_inference(best)
    return best, seconds
