"""KV-cache rows leaving and joining a running batch.

    .venv/bin/python benchmarks/cache_rows.py retire     # one retirement: rebuilt vs a tail row moved in
    .venv/bin/python benchmarks/cache_rows.py admit      # tok/s with sequences finishing and arriving all along

`retire` times `KVCache.keep_rows` for one finished row (row 3) at a few batch sizes and
capacities, with the order that keeps the other rows where they are (every later row shifts:
the cache is rebuilt) and with `compacting_order`'s (the last row takes row 3's place).
`admit` decodes 64 chat prompts through `LLM(max_batch_size=16).generate` with staggered
lengths (16-63 new tokens, `ar`, fp16 weights), so rows retire and newcomers merge in all
along, and prints tok/s. To compare with an older tree, run it with PYTHONPATH on a worktree
of it.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from blockdiff import LLM, SamplingParams
from blockdiff.bench.prompts import encode_prompts, load_prompts
from blockdiff.model.kv_cache import KVCache


def retire(llm: LLM) -> None:
    from blockdiff.model.kv_cache import compacting_order  # here: `admit` also runs on trees without it

    for batch, capacity in ((16, 512), (16, 2048), (32, 2048)):
        timings = {}
        for name, order in (("rebuilt", [r for r in range(batch) if r != 3]),
                            ("tail row moved in", compacting_order([r != 3 for r in range(batch)]))):
            cache = KVCache(llm.model.config, batch, capacity, llm.model.dtype)
            start = time.perf_counter()
            cache.keep_rows(order)
            timings[name] = f"{1e3 * (time.perf_counter() - start):.1f} ms"
        megabytes = 2 * cache.k.element_size() * cache.k[:, :1].numel() * batch / 1e6
        print(json.dumps({"batch": batch, "capacity": capacity, "cache_mb": round(megabytes), **timings}))


def admit(llm: LLM) -> None:
    prompts = encode_prompts(llm, load_prompts("chat", 64))
    lengths = [16 + (7 * i) % 48 for i in range(64)]
    llm.generate(prompts[:2], SamplingParams(mode="ar", max_new_tokens=4), use_tqdm=False)  # warm-up
    params = [SamplingParams(mode="ar", max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = sum(len(o.token_ids) for o in outs)
    print(json.dumps({"tokens": tokens, "tok_s": round(tokens / (time.perf_counter() - start), 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["retire", "admit"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.what == "retire":
        retire(LLM(spec_disable_batch_size=None, block_lengths={}))
    else:
        admit(LLM(quantization="fp16", spec_disable_batch_size=None, block_lengths={}, max_batch_size=16))


if __name__ == "__main__":
    main()
