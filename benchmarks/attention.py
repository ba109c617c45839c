"""One layer's inference attention, fused C kernel against ATen ops, by the number of queries.

    .venv/bin/python benchmarks/attention.py [--widths 1,8,32,72] [--cached 256] [--dtype auto]

SmolLM2-135M's shape (9 query heads, 3 key heads of 64 dims) over a cache of `--cached` tokens:
a causal block of W new queries, as a decode step (W=1), a verify or draft pass (8-32) or a
short prefill (72) computes it. `model/cpu_kernels.py`'s `attention` against
`model/attention.py`'s `grouped_attention` (the path without the kernels), each given the
visibility mask as the model builds it. Prints microseconds per call.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from blockdiff.model import cpu_kernels
from blockdiff.model.attention import grouped_attention, key_bias
from blockdiff.model.dtype import resolve_dtype
from blockdiff.model.kv_cache import aligned

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def microseconds(call, repeats: int) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="1,8,32,72")
    ap.add_argument("--cached", type=int, default=256)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(2)
    dtype = resolve_dtype(args.dtype)
    if not cpu_kernels.available():
        raise SystemExit("the fused CPU kernels are unavailable here (model/cpu_kernels.py logs why)")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads, {dtype}, "
          f"{args.cached} cached tokens; us per layer call")
    print("| queries | fused kernel | ATen ops | ATen / fused |\n|---|---|---|---|")
    with torch.inference_mode():
        for width in (int(w) for w in args.widths.split(",")):
            span = aligned(args.cached + width)
            k, v = (torch.randn(1, KV_HEADS, span, HEAD_DIM).to(dtype) for _ in range(2))
            q = torch.randn(1, width, HEADS, HEAD_DIM).to(dtype)
            visible = torch.ones(width, span, dtype=torch.bool).tril(args.cached)[None]  # (1, W, span): causal
            bias = key_bias(visible[:, None])
            fused = microseconds(lambda: cpu_kernels.attention(q, k, v, span, visible), args.repeats)
            aten = microseconds(lambda: grouped_attention(q, k, v, bias), args.repeats)
            print(f"| {width} | {fused:.0f} | {aten:.0f} | {aten / fused:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
