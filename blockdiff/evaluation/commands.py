"""`blockdiff eval`: accuracy of every decoding mode on the shipped tasks, next to its TPF."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from blockdiff.sampling import MODES
from blockdiff.model.dtype import DTYPE_CHOICES, dtype_name
from blockdiff.model.quantize import QUANTIZATION_HELP, QUANTIZATIONS

DEFAULT_MODES = "ar,diffusion,linear_spec,quad_spec"


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy vs tokens-per-forward of each mode on the shipped tasks",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF/NLD directory, .gguf file or a name in models/ "
                                                 "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="a LoRA draft adapter directory")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help=QUANTIZATION_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", default="code,qa", help="task kinds: code, qa")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"any of: {', '.join(MODES)}")
    p.add_argument("--thresholds", default="0.5,0.7,0.9,0.95", help="diffusion thresholds (one row each)")
    p.add_argument("--threshold", type=float, default=0.9, help="threshold for the other modes")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--quad-block-length", type=int, default=8,
                   help="block length for quad_spec, whose fused pass costs L*(L+1) tokens")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="per prompt (default: 128 for code, 16 for QA)")
    p.add_argument("--limit", type=int, default=None, help="first N tasks of each kind")
    p.add_argument("--out", default="runs/eval", help="directory for results.json and accuracy_vs_tpf.png")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per sandboxed test program")
    p.add_argument("--workers", type=int, default=4, help="test programs run at once")
    p.set_defaults(func=cmd_eval)


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_eval(args) -> None:
    from blockdiff.evaluation.report import markdown_table, write_json, write_plot
    from blockdiff.evaluation.runner import configurations, evaluate, sampling_params
    from blockdiff.evaluation.sandbox import SandboxLimits
    from blockdiff.evaluation.tasks import load_tasks

    try:
        thresholds = [float(t) for t in _split(args.thresholds)]
    except ValueError:
        raise ValueError(f"--thresholds must be comma-separated numbers, got {args.thresholds!r}") from None
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.timeout <= 0 or args.workers < 1:
        raise ValueError("--timeout must be > 0 and --workers >= 1")
    tasks = load_tasks(_split(args.tasks), args.limit)
    if not tasks:
        raise ValueError("no tasks selected")
    configs = configurations(_split(args.modes), thresholds, args.block_length,
                             args.quad_block_length, args.threshold)
    for c in configs:  # bad modes, blocks, thresholds fail before the model loads
        for kind in {t.kind for t in tasks}:
            sampling_params(c, kind, args.max_new_tokens)

    from blockdiff.engine.llm import LLM
    model = None if args.model in (None, "default") else args.model
    llm = LLM(model, dtype=args.dtype, device=args.device, adapter=args.adapter, quantization=args.quantization)
    llm.generate("def f(x):", max_new_tokens=2, use_tqdm=False)  # one-time kernel set-up is not decoding time
    limits = SandboxLimits(timeout_s=args.timeout)
    show_bar = sys.stderr.isatty()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.model or "SmolLM2-135M-Instruct"
    dtype = dtype_name(llm.model.dtype)  # what "auto" resolved to
    meta = {"model": name, "model_path": llm.model_path, "adapter": llm.adapter, "dtype": dtype,
            "device": args.device, "tasks": _split(args.tasks), "limit": args.limit,
            "max_new_tokens": args.max_new_tokens, "temperature": 0.0,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}
    results = []
    for c in configs:
        results.append(evaluate(llm, tasks, c, max_new_tokens=args.max_new_tokens, limits=limits,
                                workers=args.workers, use_tqdm=show_bar))
        s = results[-1].summary()
        acc = " ".join(f"{k}={100 * v:.1f}%" for k, v in s["accuracy"].items() if k != "all")
        print(f"[eval] {c.label}: {acc} tpf={s['tpf']:.2f} decode={s['wall_s']:.1f}s", file=sys.stderr)
        # rewritten after every configuration: a long run that is stopped keeps what it measured
        write_json(out / "results.json", results, meta)
    write_plot(out / "accuracy_vs_tpf.png", results, f"{name} ({dtype}): accuracy vs TPF")
    print(markdown_table(results))
    print(f"wrote {out / 'results.json'} and {out / 'accuracy_vs_tpf.png'}")
