"""Prefill of long prompts: the pass width, and a decoding stream's wait while a long prompt
arrives. The prompt sets of mixed and long prompts for `blockdiff bench` are beside this file.

    .venv/bin/python benchmarks/prefill.py widths [--lengths 128,512,1024,2048] [--chunks 64,128,256]
    .venv/bin/python benchmarks/prefill.py stall
    blockdiff bench --prompt-set benchmarks/prefill_prompts/mixed.jsonl ...   # and long.jsonl

`widths` caches one random prompt of each length in passes of each width (and in one pass)
and prints seconds. `stall` decodes one `ar` stream of 60 tokens and, after its 10th, adds the
second prompt of long.jsonl (2385 tokens) to the same scheduler; it prints the stream's
longest and median wait between tokens and the long prompt's time to first token.
mixed.jsonl: 16 chat prompts, every 8th replaced by a README excerpt of 976 tokens in a
"Summarize this document" message; long.jsonl: 4 such excerpts of 1307-2463 tokens. To
compare with an older tree, run the same command with PYTHONPATH on a worktree of it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from blockdiff import LLM, SamplingParams
from blockdiff.bench.prompts import encode_prompts, load_prompts
from blockdiff.decoding.sequence import Sequence
from blockdiff.engine.request import Request
from blockdiff.model.kv_cache import KVCache

PROMPTS = Path(__file__).resolve().parent / "prefill_prompts"


def widths(llm: LLM, lengths: list[int], chunks: list[int]) -> None:
    model = llm.model
    with torch.inference_mode():
        for length in lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, length))
            for chunk in [length, *chunks]:
                cache = KVCache(model.config, 1, length, model.dtype, model.device)
                start = time.perf_counter()
                for lo in range(0, length, chunk):
                    model(ids[:, lo:lo + chunk], cache=cache)
                    cache.advance(min(chunk, length - lo))
                label = "one pass" if chunk == length else f"passes of {chunk}"
                print(f"{length} tokens, {label}: {time.perf_counter() - start:.2f} s", flush=True)


def stall(llm: LLM) -> None:
    long_prompt = encode_prompts(llm, load_prompts(str(PROMPTS / "long.jsonl")))[1]
    short_prompt = encode_prompts(llm, load_prompts("chat", 1))[0]
    params = SamplingParams(mode="ar", max_new_tokens=60, temperature=0.0, ignore_eos=True)
    llm.generate([short_prompt], SamplingParams(mode="ar", max_new_tokens=4), use_tqdm=False)  # warm-up
    scheduler = llm.make_scheduler()
    stream = Request(Sequence(short_prompt, params))
    late = Request(Sequence(long_prompt, SamplingParams(mode="ar", max_new_tokens=8, temperature=0.0)))
    scheduler.add(stream)
    token_times, added, first = [], None, None
    while scheduler.has_work():
        if added is None and len(stream.seq.output_ids) == 10:
            scheduler.add(late)
            added = time.perf_counter()
        before = len(stream.seq.output_ids)
        scheduler.step()
        now = time.perf_counter()
        if before and len(stream.seq.output_ids) > before:
            token_times.append(now)
        if first is None and late.seq.output_ids:
            first = now
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    print(json.dumps({"long_prompt_tokens": len(long_prompt), "stream_longest_wait_s": round(max(gaps), 3),
                      "stream_median_wait_s": round(statistics.median(gaps), 4),
                      "long_prompt_first_token_s": round(first - added, 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["widths", "stall"])
    parser.add_argument("--lengths", default="128,512,1024,2048")
    parser.add_argument("--chunks", default="64,128,256")
    parser.add_argument("--quantization", default="fp16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    llm = LLM(quantization=args.quantization, spec_disable_batch_size=None, block_lengths={})
    if args.what == "widths":
        widths(llm, [int(n) for n in args.lengths.split(",")], [int(n) for n in args.chunks.split(",")])
    else:
        stall(llm)


if __name__ == "__main__":
    main()
