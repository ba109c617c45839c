"""`blockdiff bench`: every mode (and transformers' baselines) on one prompt set, one table."""
from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

from blockdiff import sampling
from blockdiff.bench.results import acceptance_profile
from blockdiff.bench.settings import BenchSettings
from blockdiff.engine.block_lengths import SPEC_DISABLE_HELP, SPEC_MODES, save_profile, spec_disable_batch_size_arg
from blockdiff.model.dtype import DTYPE_CHOICES
from blockdiff.model.quantize import QUANTIZATION_CHOICES, QUANTIZATION_HELP
from blockdiff.model.step_graphs import CUDA_GRAPHS_HELP


def _list_of(kind, name: str):
    """argparse type for comma-separated lists: "16,32" -> [16, 32]."""
    def parse(text: str):
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated {kind.__name__}s, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError(f"{name}: empty list")
        return values
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options `blockdiff bench` and benchmarks/modes.py share."""
    d = BenchSettings()
    p.add_argument("--prompt-set", default=d.prompt_set,
                   help='built-in set (chat: instructions in the chat template; code: raw Python openings) '
                        'or a JSONL file of {"prompt": ...} or {"messages": [...]} lines')
    p.add_argument("--num-prompts", type=int, default=None,
                   help="use this many prompts: truncates the set, or cycles it (for large batches)")
    p.add_argument("--model", default=None, help="HF/NLD directory, .gguf file or a name in models/ "
                                                 "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="a LoRA draft adapter directory")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPE_CHOICES)
    p.add_argument("--quantization", default=d.quantization, choices=QUANTIZATION_CHOICES, help=QUANTIZATION_HELP)
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--cuda-graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    # MODES is read when the parser is built, so a mode added to blockdiff.sampling shows up here
    p.add_argument("--modes", type=_list_of(str, "--modes"), default=list(sampling.MODES),
                   help=f"comma-separated, any of {', '.join(sampling.MODES)} (ar always runs: it is the reference)")
    p.add_argument("--block-lengths", "--block-length", dest="block_lengths", type=_list_of(int, "--block-lengths"),
                   default=d.block_lengths, help="comma-separated, e.g. 8,16,32")
    p.add_argument("--quad-block-length", dest="quad_block_lengths", type=_list_of(int, "--quad-block-length"),
                   default=None, help="block length(s) for quad_spec, whose fused pass costs L*(L+1) tokens "
                                      "(default: --block-lengths)")
    p.add_argument("--spec-disable-batch-size", type=spec_disable_batch_size_arg, default=d.spec_disable_batch_size,
                   help=SPEC_DISABLE_HELP)
    p.add_argument("--thresholds", "--threshold", dest="thresholds", type=_list_of(float, "--thresholds"),
                   default=d.thresholds, help="comma-separated diffusion thresholds, e.g. 0.5,0.7,0.9")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (temperature > 0)")
    p.add_argument("--batch-size", dest="batch_sizes", type=_list_of(int, "--batch-size"), default=d.batch_sizes,
                   help="prompts decoded together; comma-separated to sweep, e.g. 1,4,16")
    p.add_argument("--repeats", type=int, default=d.repeats, help="round-robin repeats; each keeps its fastest run")
    p.add_argument("--prompt-lookup-tokens", type=int, default=d.prompt_lookup_tokens,
                   help="draft length of transformers' prompt-lookup baseline")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' baselines")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp baseline")


def settings_from_args(args) -> BenchSettings:
    fields = BenchSettings.__dataclass_fields__
    settings = BenchSettings(**{k: v for k, v in vars(args).items() if k in fields})
    settings.hf_baselines = not args.no_hf
    settings.llama_cpp = not args.no_llama_cpp
    settings.validate()  # bad values fail before the model loads
    return settings


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark every mode and transformers' baselines on a prompt set",
                              description=__doc__ + "\n\nWrites bench.json, table.md and PNGs to --out "
                              "and prints the table.", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--out", default="bench-out", help="directory for bench.json, table.md and the PNGs")
    p.add_argument("--save-acceptance", metavar="ADAPTER_DIR", default=None,
                   help="write the spec modes' acceptance by draft position into this draft adapter's "
                        "acceptance.json, from which LLM picks their block lengths per machine (temperature 0; "
                        "run them at the longest block lengths worth considering, on held-out prompts)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> None:
    from blockdiff.bench.report import markdown_report, write_outputs
    from blockdiff.bench.runner import run_bench
    settings = settings_from_args(args)
    if args.save_acceptance:
        check_acceptance_target(settings, args.save_acceptance)
    bench = run_bench(settings, log=lambda msg: print(msg, file=sys.stderr))
    print(markdown_report(bench))
    for path in write_outputs(bench, args.out):
        print(f"wrote {path}", file=sys.stderr)
    if args.save_acceptance:
        measured = (f"blockdiff bench on {bench.prompt_count} {settings.prompt_set} prompts, max_new_tokens "
                    f"{settings.max_new_tokens}, {date.today().isoformat()}: {bench.command}")
        path = save_profile(args.save_acceptance, acceptance_profile(bench.results, measured))
        print(f"wrote {path}", file=sys.stderr)


def check_acceptance_target(settings: BenchSettings, adapter_dir: str) -> None:
    """Refuse, before the model loads, a --save-acceptance run that could not measure a profile."""
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ValueError(f"--save-acceptance: {adapter_dir} is not a draft adapter directory (no adapter_config.json)")
    if settings.temperature != 0:
        raise ValueError("--save-acceptance measures greedy acceptance: use --temperature 0")
    if not set(settings.modes) & set(SPEC_MODES):
        raise ValueError(f"--save-acceptance needs a spec mode among --modes ({', '.join(SPEC_MODES)})")
    if settings.spec_disable_batch_size is not None and max(settings.batch_sizes) > 1:
        raise ValueError("--save-acceptance measures a draft at every step: batches of more than one prompt "
                         "need --spec-disable-batch-size never")
