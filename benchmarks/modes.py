"""`blockdiff bench` plus two measurements it does not make: the cost of a block forward
against a one-token forward, and the memory-bandwidth floor for AR decoding.

    .venv/bin/python benchmarks/modes.py [--model M] [--max-new-tokens 64] [--block-length 32] [--json F]

Every `blockdiff bench` option works here (see `blockdiff bench --help`); the mode table,
the baselines and acceptance by draft position come from blockdiff.bench. --out DIR also
writes bench's JSON and PNGs there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blockdiff import LLM  # noqa: E402
from blockdiff.bench import load_llm, markdown_report, run_bench, write_outputs  # noqa: E402
from blockdiff.bench.commands import add_arguments, settings_from_args  # noqa: E402
from blockdiff.model.kv_cache import KVCache  # noqa: E402


@torch.inference_mode()
def forward_cost(llm: LLM, widths: list[int], context: int = 256, repeats: int = 10) -> dict[int, float]:
    """Seconds for one forward of each number of new tokens in `widths` over a `context`-token cache."""
    model = llm.model
    cache = KVCache(model.config, 1, context + max(widths) + 1, model.dtype, model.device)
    ids = torch.randint(0, model.config.vocab_size, (1, context + max(widths)))  # (1, context + widest)
    model(ids[:, :context], cache=cache)
    cache.advance(context)
    result = {}
    for n in widths:
        model.logits(model(ids[:, context:context + n], cache=cache))  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model.logits(model(ids[:, context:context + n], cache=cache))
        result[n] = (time.perf_counter() - start) / repeats
    return result


def break_even_lines(cost: dict[int, float], blocks: list[int], quad_block: int) -> list[str]:
    """How many tokens a step must commit for a spec mode to match `ar` at this forward cost:
    linear_spec pays a draft and a verify forward of L tokens, quad_spec one of L + L*L."""
    lines = [f"linear_spec L={L}: a step costs {2 * cost[L] / cost[1]:.2f} AR forwards" for L in blocks]
    q = quad_block + quad_block * quad_block
    return lines + [f"quad_spec L={quad_block}: a step ({q} tokens) costs {cost[q] / cost[1]:.2f} AR forwards"]


def read_bandwidth_gb_s() -> float:
    """Effective copy bandwidth (bytes read + written per second) of a 512 MiB buffer."""
    a = torch.empty(512 * 2**20, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    start = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    return 2 * a.numel() * 5 / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--out", default=None, help="also write bench.json, table.md and the PNGs here")
    ap.add_argument("--json", default=None, help="write bench's results plus the extra measurements here")
    args = ap.parse_args()
    settings = settings_from_args(args)
    llm = load_llm(settings)
    bench = run_bench(settings, llm)
    print(markdown_report(bench))

    blocks = settings.block_lengths or [llm.block_lengths["linear_spec"]]
    quad = (settings.quad_block_lengths or settings.block_lengths or [llm.block_lengths["quad_spec"]])[0]
    cost = forward_cost(llm, sorted({1, 8, *blocks, quad + quad * quad}))
    weight_bytes = bench.model["weight_bytes"]
    bandwidth = read_bandwidth_gb_s()
    ar = next((r for r in bench.results if r.name == "ar"), None)
    print("\nforward over a 256-token cache: " + ", ".join(
        f"{n} token{'s' * (n > 1)} {t * 1e3:.1f} ms ({t / cost[1]:.2f}x)" for n, t in cost.items()))
    print("\n".join(break_even_lines(cost, blocks, quad)))
    print(f"AR floor: {weight_bytes / 1e6:.0f} MB / {bandwidth:.1f} GB/s copy bandwidth = "
          f"{weight_bytes / bandwidth / 1e6:.1f} ms per token; measured {1e3 / ar.tok_s:.1f} ms")
    if args.out:
        write_outputs(bench, args.out)
    if args.json:
        Path(args.json).write_text(json.dumps({**bench.to_dict(), "forward_cost_s": cost,
                                               "bandwidth_gb_s": bandwidth}, indent=1))


if __name__ == "__main__":
    main()
