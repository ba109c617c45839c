"""Which weight format multiplies fastest on this CPU, at the row counts the modes use.

    .venv/bin/python benchmarks/kernels.py [--rows 1,8,32] [--repeats 3]

Times the 120 per-layer products of SmolLM2-135M (fused q/k/v, fused gate/up, o, down; 30
layers) with random weights that, like a real forward's, do not fit in cache, through each
weight format the engine can use: oneDNN-packed float32 and bf16 (`model/lora.py`'s
`linear`, where the CPU has a bf16 path), fbgemm's fp16 weights, ATen's weight-only int8
(`_weight_int8pack_mm`) and int4 (`model/quantize.py`), and blockdiff's w4a8 kernel (int4
weights, int8 activations; `model/cpu_w4a8.c`, where the fused kernels build), with float32 activations and, where
bf16 is native, bf16 ones (the kernels take other paths). Prints milliseconds per pass: a
lower figure at 1 row favours `ar` and small batches, at 8-32 rows the spec modes' draft and
verify passes.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from blockdiff.model.lora import linear, pack_for_cpu
from blockdiff.model import cpu_kernels
from blockdiff.model.quantize import quantize_fp16, quantize_int4, quantize_int8, quantize_w4a8

SHAPES = [(960, 576), (3072, 576), (576, 576), (576, 1536)] * 30  # (out, in) of one forward's products


def fp16_product(weight: torch.Tensor):
    packed = quantize_fp16(weight)
    return lambda x: linear(x, None, packed)


def packed_product(weight: torch.Tensor):
    packed = pack_for_cpu(weight)
    return lambda x: linear(x, weight, packed)


def in_bf16(make):
    """The format made from the bf16 weight, fed bf16 activations (what a bf16 model runs)."""
    def made(weight: torch.Tensor):
        product = make(weight.bfloat16())
        return lambda x: product(x.bfloat16())
    return made


def formats() -> dict:
    """name -> (weight -> product function), for the formats this CPU supports: float32
    activations, and where bf16 is native (a packed bf16 path exists) bf16 ones too."""
    out = {"float32 packed": packed_product, "fp16 weights (fbgemm)": fp16_product,
           "int8 weight-only": quantize_int8, "int4 weight-only": quantize_int4}
    if cpu_kernels.available():
        out["w4a8"] = quantize_w4a8
    if pack_for_cpu(torch.zeros(16, 16, dtype=torch.bfloat16)) is not None:
        out |= {"bf16 packed": in_bf16(packed_product), "int8 weight-only, bf16 activations": in_bf16(quantize_int8),
                "int4 weight-only, bf16 activations": in_bf16(quantize_int4)}
        if cpu_kernels.available():
            out["w4a8, bf16 activations"] = in_bf16(quantize_w4a8)
        if cpu_kernels.bf16_tiles():
            out["bf16 AMX tiles"] = in_bf16(cpu_kernels.pack_bf16_tiles)
    return out


def time_pass(products, rows: int, repeats: int) -> float:
    inputs = {fan_in: torch.randn(rows, fan_in) for fan_in in (576, 1536)}

    def one_pass():
        for product, (_, fan_in) in zip(products, SHAPES):
            product(inputs[fan_in])

    one_pass()
    start = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [int(r) for r in args.rows.split(",")]
    weights = [torch.randn(out, inp) * 0.02 for out, inp in SHAPES]
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads; "
          f"ms per pass of {len(SHAPES)} products")
    print("| format | " + " | ".join(f"{r} row{'s' * (r > 1)}" for r in rows) + " |\n|---|" + "---|" * len(rows))
    with torch.inference_mode():
        for name, make in formats().items():
            products = [make(w) for w in weights]
            print(f"| {name} | " + " | ".join(f"{time_pass(products, r, args.repeats):.1f}" for r in rows) + " |",
                  flush=True)
            del products


if __name__ == "__main__":
    main()
