"""Command line: `blockdiff generate`, `blockdiff compare`, and the subcommands that the
server, training and benchmark packages register (each module in COMMAND_MODULES has
`register(subparsers)`, which adds its parser with `set_defaults(func=...)`)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from blockdiff.model.dtype import DTYPE_CHOICES
from blockdiff.model.quantize import QUANTIZATION_CHOICES, QUANTIZATION_HELP
from blockdiff.model.step_graphs import CUDA_GRAPHS_HELP
from blockdiff.sampling import DECODING_MODES, MODES, SamplingParams


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="HF/NLD directory, .gguf file or a name in models/ "
                                                 "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="a LoRA draft adapter directory")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--quantization", default="none", choices=QUANTIZATION_CHOICES,
                   help=QUANTIZATION_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cuda-graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--block-length", type=int, default=None,
                   help="draft/denoise block length (default: per mode; the spec modes' chosen per machine "
                        "when the adapter ships acceptance.json, engine/block_lengths.py)")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")


COMMAND_MODULES: list[str] = ["blockdiff.train.commands", "blockdiff.server.commands", "blockdiff.bench.commands",
                                 "blockdiff.evaluation.commands"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockdiff", description="blockdiff: one checkpoint, four decoding modes")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="decode one prompt in one mode")
    _add_model_args(gen)
    gen.add_argument("--mode", default="ar", choices=MODES)
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, metrics")
    gen.set_defaults(func=cmd_generate)
    cmp_ = sub.add_parser("compare", help="decode one prompt in every mode and tabulate the metrics")
    _add_model_args(cmp_)
    cmp_.add_argument("--modes", default=",".join(DECODING_MODES))
    cmp_.add_argument("--quad-block-length", type=int, default=None,
                      help="block length for quad_spec, whose fused pass costs L*(L+1) tokens (default: "
                           "--block-length if given, else quad_spec's own default)")
    cmp_.set_defaults(func=cmd_compare)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _params(args, mode: str) -> SamplingParams:
    block = args.block_length
    if mode == "quad_spec" and getattr(args, "quad_block_length", None):
        block = args.quad_block_length
    return SamplingParams(mode=mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, block_length=block,
                          threshold=args.threshold, seed=args.seed)


def _run(llm, args, mode: str):
    params = _params(args, mode)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    show_bar = sys.stderr.isatty()  # a progress bar for people, not for logs and pipes
    return (llm.chat(prompt, params, use_tqdm=show_bar) if args.chat else llm.generate(prompt, params, use_tqdm=show_bar))[0]


def _load(args):
    from blockdiff.engine.llm import LLM
    return LLM(args.model, dtype=args.dtype, device=args.device, adapter=args.adapter,
               quantization=args.quantization, cuda_graphs=args.cuda_graphs,
               spec_disable_batch_size=None)  # one prompt at a time: no batch to weigh


def cmd_generate(args) -> None:
    _params(args, args.mode)  # bad values fail before the model loads
    out = _run(_load(args), args, args.mode)
    if args.json:
        print(json.dumps(out.to_dict()))
        return
    print(out.text)
    m = out.metrics
    print(f"[{args.mode}] tokens={m.generated_tokens} nfe={m.nfe} tpf={m.tpf:.2f} "
          f"tok/s={m.tokens_per_s:.1f} finish={out.finish_reason}", file=sys.stderr)


def cmd_compare(args) -> None:
    from blockdiff.bench.report import format_table
    modes = [m.strip() for m in args.modes.split(",")]
    for mode in modes:
        _params(args, mode)
    llm = _load(args)
    llm.generate(args.prompt, max_new_tokens=2, use_tqdm=False)  # one-time kernel set-up is not decoding speed
    outs = {mode: _run(llm, args, mode) for mode in modes}
    reference = outs.get("ar")
    rows = []
    for mode, out in outs.items():
        m = out.metrics
        same = "-" if reference is None else ("yes" if out.token_ids == reference.token_ids else "no")
        accept = "-" if m.acceptance is None else f"{m.acceptance:.2f}"
        rows.append([mode, "-" if mode == "ar" else out.block_length, m.generated_tokens, m.nfe, f"{m.tpf:.2f}", accept, f"{m.tokens_per_s:.1f}", same])
    print(f"prompt: {args.prompt!r}")
    for mode, out in outs.items():
        print(f"--- {mode}: {out.text!r}")
    print(format_table(rows, ["mode", "L", "tokens", "NFE", "TPF", "accept", "tok/s", "same as ar"]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # bad input: one clear line, no traceback
        print(f"blockdiff: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
