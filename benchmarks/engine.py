"""Engine speed of source trees against each other, in one run: forward cost by width and
decode speed by mode, with the spec modes' "same as ar" count.

    .venv/bin/python benchmarks/engine.py [--trees . ../old-checkout] [--quantizations none,fp16]
                                          [--dtype auto] [--rounds 3]

Each round runs one worker process per tree and weight format, in alternating order (A B,
then B A, ...), so drift of a shared VM falls on every column alike; the table gives each
figure's median over rounds. A worker imports blockdiff from its tree, so any commit can be a baseline
(`git worktree add ../old <commit>`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WIDTHS = (1, 4, 8, 16, 32, 72)
MODES = (("ar", 32), ("linear_spec", 8), ("linear_spec", 32), ("quad_spec", 4), ("diffusion", 32))


def worker(dtype: str, quantization: str, num_prompts: int, max_new_tokens: int, repeats: int) -> dict:
    import torch

    import blockdiff
    from blockdiff import LLM, SamplingParams
    from blockdiff.bench.prompts import encode_prompts, load_prompts
    from blockdiff.model.kv_cache import KVCache

    torch.set_num_threads(2)
    llm = LLM(dtype=dtype, quantization=quantization)
    model = llm.model
    result = {"source": str(Path(blockdiff.__file__).parents[1]), "dtype": str(model.dtype), "forward_ms": {}, "tok_s": {}, "same_as_ar": {}}
    with torch.inference_mode():
        ids = torch.randint(0, model.config.vocab_size, (1, 256 + max(WIDTHS)))  # (1, context + widest)
        cache = KVCache(model.config, 1, ids.shape[1], model.dtype)
        model(ids[:, :256], cache=cache)
        cache.advance(256)
        for width in WIDTHS:
            model.logits(model(ids[:, 256:256 + width], cache=cache))  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model.logits(model(ids[:, 256:256 + width], cache=cache))
                times.append(time.perf_counter() - start)
            result["forward_ms"][width] = 1e3 * statistics.median(times)
    prompts = encode_prompts(llm, load_prompts("chat", num_prompts))
    reference = None
    for mode, block in MODES:
        params = SamplingParams(mode=mode, block_length=block, max_new_tokens=max_new_tokens, temperature=0.0)
        start = time.perf_counter()
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]  # batch 1
        elapsed = time.perf_counter() - start
        tokens = [o.token_ids for o in outs]
        reference = reference or tokens
        label = f"{mode} L={block}"
        result["tok_s"][label] = sum(map(len, tokens)) / elapsed
        result["same_as_ar"][label] = sum(a == b for a, b in zip(tokens, reference))
    return result


def run_worker(tree: str, quantization: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    cmd = [sys.executable, __file__, "--worker", "--dtype", args.dtype, "--quantizations", quantization,
           "--num-prompts", str(args.num_prompts), "--max-new-tokens", str(args.max_new_tokens),
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(trees: list[str], runs: dict[str, list[dict]]) -> str:
    """One column per key of `runs` (a tree, or a tree and a weight format), in `trees` order."""
    def median(tree, section, key):
        return statistics.median(r[section][key] for r in runs[tree])

    first = runs[trees[0]][0]
    header = "| measure | " + " | ".join(trees) + " |\n|---|" + "---|" * len(trees)
    rows = [f"| forward, {w} token{'s' * (w > 1)} (ms) | " + " | ".join(
        f"{median(t, 'forward_ms', str(w)):.1f}" for t in trees) + " |" for w in WIDTHS]
    for label in first["tok_s"]:
        rows.append(f"| {label}, batch 1 (tok/s) | " + " | ".join(
            f"{median(t, 'tok_s', label):.1f} (same as ar {runs[t][-1]['same_as_ar'][label]}"
            f"/{runs[t][-1]['same_as_ar']['ar L=32']})" for t in trees) + " |")
    return "\n".join([header, *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs="+", default=["."], help="source trees to compare (each holds blockdiff/)")
    ap.add_argument("--quantizations", default="none", help="comma-separated weight formats, a column each per tree")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15, help="timed forwards per width per worker")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.dtype, args.quantizations, args.num_prompts, args.max_new_tokens, args.repeats)))
        return
    quantizations = args.quantizations.split(",")
    columns = {(f"{tree} {q}" if len(quantizations) > 1 else tree): (tree, q)
               for tree in args.trees for q in quantizations}
    runs: dict[str, list[dict]] = {name: [] for name in columns}
    for r in range(args.rounds):
        for name in (list(columns) if r % 2 == 0 else list(columns)[::-1]):
            tree, quantization = columns[name]
            runs[name].append(run_worker(tree, quantization, args))
            assert Path(runs[name][-1]["source"]) == Path(tree).resolve(), runs[name][-1]["source"]
            print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}, dtype {args.dtype} ({next(iter(runs.values()))[0]['dtype']}), 2 threads, "
          f"median of {args.rounds} rounds\n")
    print(table(list(columns), runs))


if __name__ == "__main__":
    main()
