"""CLI: `blockdiff train`, `convert`, `distill`, `plot-train` and `tokenizer train`.

Every config field can be overridden after --config: by dotted path (`--optim.lr 3e-4`,
`--model.num_layers 4`) or by its bare name where that is unique (`--lr 3e-4`,
`--max_steps 100`); dashes and underscores are interchangeable (`--max-steps`).
"""
from __future__ import annotations

import argparse
import sys

from blockdiff.model.dtype import DTYPE_CHOICES

_PREFIX = "ov__"


def _add_overrides(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from blockdiff.train.config import leaf_paths
    g = p.add_argument_group("config overrides (YAML values; see configs/*.yaml)")
    for name, dotted in sorted(leaf_paths().items()):
        if name in skip or dotted in skip or any(dotted.startswith(s + ".") for s in skip):
            continue
        flags = list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]))
        g.add_argument(*flags, dest=_PREFIX + dotted, default=None, metavar="V",
                       help=argparse.SUPPRESS if name != dotted else None)


def _overrides(args) -> dict[str, str]:
    return {k[len(_PREFIX):]: v for k, v in vars(args).items() if k.startswith(_PREFIX) and v is not None}


def _run(cfg, args) -> None:
    from blockdiff.train.loop import train
    if args.print_config:
        from blockdiff.train.config import describe
        print(describe(cfg), end="")
        return
    out = train(cfg, resume=args.resume, log=lambda m: print(m, file=sys.stderr))
    print(out)


def cmd_train(args) -> None:
    from blockdiff.train.config import load_config
    _run(load_config(args.config, _overrides(args)), args)


def cmd_convert(args) -> None:
    from blockdiff.train.config import load_config, read_config_file
    ov = _overrides(args)
    raw = read_config_file(args.config) if args.config else {}
    if args.model or raw.get("base_model") is None:
        ov["base_model"] = args.model or "default"  # default: the embedded SmolLM2
    if args.target:
        ov["target"] = args.target
    if args.out:
        ov["run.out_dir"] = args.out
    _run(load_config(args.config, ov), args)


def cmd_plot(args) -> None:
    from blockdiff.train.plot import plot_run
    print(plot_run(args.run_dir, args.out, args.smooth))


def cmd_tokenizer_train(args) -> None:
    from blockdiff.train.data import list_files
    from blockdiff.train.tokenizer_train import read_texts, save_tokenizer, special_ids, train_tokenizer
    files = list_files(args.paths, args.ext, args.exclude_dir)
    if not files:
        raise ValueError(f"no files with extensions {args.ext} under {args.paths}")
    tok = train_tokenizer(read_texts(files), vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    save_tokenizer(tok, args.out)
    print(f"{args.out}: {tok.vocab_size} tokens from {len(files)} files; special ids {special_ids(tok)}")


def cmd_distill(args) -> None:
    from blockdiff.engine.llm import LLM
    from blockdiff.bench.prompts import load_prompts
    from blockdiff.train.distill import distill
    prompts = load_prompts(args.prompts)
    if args.limit:
        prompts = prompts[:args.limit]
    llm = LLM(args.model, dtype=args.dtype, device=args.device, adapter=args.adapter)
    written = distill(llm, prompts, args.out, batch_size=args.batch_size, chat=not args.raw,
                      log=lambda m: print(m, file=sys.stderr), mode="ar",
                      max_new_tokens=args.max_new_tokens, temperature=0.0)
    print(f"{args.out}: {written} new records")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML (or TOML/JSON) training config")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from the newest good checkpoint in run.out_dir (or the one named)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def register(sub) -> None:
    t = sub.add_parser("train", allow_abbrev=False, help="train a model with the AR + block-diffusion objective",
                       description="Train from scratch (model architecture in the config) or continue a checkpoint "
                                   "(base_model). Multi-process: python -m torch.distributed.run "
                                   "--nproc_per_node N -m blockdiff.cli train ...")
    _common(t)
    _add_overrides(t)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("convert", allow_abbrev=False,
                       help="continue a pretrained AR model with the SPEC section 4 objective",
                       description="Turn an AR checkpoint into a three-mode model: full weights (an HF/NLD "
                                   "directory) or a draft-only LoRA (a PEFT adapter) in RUN/final.")
    _common(c)
    c.add_argument("--model", default=None, help="HF/NLD dir, .gguf, a name in models/, or 'default' (SmolLM2)")
    c.add_argument("--target", choices=["full", "lora"], default=None)
    c.add_argument("--out", default=None, help="run directory (run.out_dir)")
    _add_overrides(c, skip=("model", "target", "base_model"))
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("distill", help="write a model's own greedy answers to prompts (drafter training data)",
                       description="Self-distillation: answer each JSONL prompt ({'prompt'} or {'messages'}) "
                                   "with the model's temperature-0 AR output; append-only and resumable.")
    d.add_argument("prompts", help="JSONL of prompts ({'prompt'} or {'messages'} lines), or a built-in bench set")
    d.add_argument("--out", required=True, help="output JSONL (extended if it exists)")
    d.add_argument("--model", default=None, help="HF/NLD dir, .gguf or a name in models/ (default: SmolLM2)")
    d.add_argument("--adapter", default=None)
    d.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    d.add_argument("--device", default="cpu")
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--limit", type=int, default=None, help="answer only the first N prompts")
    d.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    d.set_defaults(func=cmd_distill)

    pl = sub.add_parser("plot-train", help="draw a run's AR and diffusion loss curves to a PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    pl.add_argument("--smooth", type=int, default=1, help="trailing mean over this many logged steps")
    pl.set_defaults(func=cmd_plot)

    tk = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = tk.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train a byte-level BPE with mask and chat special tokens")
    tt.add_argument("paths", nargs="+", help="files or directories of text")
    tt.add_argument("--out", required=True, help="output directory (tokenizer.json, tokenizer_config.json)")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--min-frequency", type=int, default=2)
    tt.add_argument("--ext", nargs="+", default=[".py", ".txt", ".md", ".rst"])
    tt.add_argument("--exclude-dir", nargs="+", default=["__pycache__", ".git"])
    tt.set_defaults(func=cmd_tokenizer_train)
