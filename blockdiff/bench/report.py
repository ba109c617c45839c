"""What a benchmark run reports: the machine and model it ran on, and the markdown table."""
from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone

import torch

from blockdiff.bench.results import Result, reference_for
from blockdiff.model.dtype import native_bf16


def cpu_name() -> str:
    """The CPU's model name (platform.processor() is only "x86_64" on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Enough to tell two result files' machines apart (numbers are only comparable within one)."""
    env = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": sys.version.split()[0],
           "platform": platform.platform(), "processor": cpu_name(), "native_bf16_cpu": native_bf16("cpu"),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def model_info(llm) -> dict:
    params = list(llm.model.parameters())
    return {"path": llm.model_path, "adapter": llm.adapter, "dtype": str(llm.model.dtype).removeprefix("torch."),
            "quantization": llm.model.quantization, "cuda_graphs": llm.model.step_graphs is not None,
            "device": str(llm.model.device), "parameters": sum(p.numel() for p in params),
            "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "mask_token_id": llm.config.mask_token_id, "block_lengths": llm.block_lengths,
            "block_length_estimates": llm.block_length_estimates, "spec_disable_batch_size": llm.spec_limits}


def mode_name(r: Result) -> str:
    """The requested mode, with what it resolved to when that differs (mode="auto" picks per request)."""
    if r.config is None:
        return r.name
    if set(r.resolved_modes) in (set(), {r.mode}):
        return r.mode
    resolved = ", ".join(f"{m} {n}" if len(r.resolved_modes) > 1 else m for m, n in sorted(r.resolved_modes.items()))
    return f"{r.mode} (→ {resolved})"


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table_rows(results: list[Result], prompt_count: int) -> list[list[str]]:
    rows = []
    for r in results:
        ref = reference_for(r, results)
        speed = f"{r.tok_s / ref.tok_s:.2f}x" if ref is not None and ref.tok_s else "-"
        same = "-" if r.same_as_ar is None else f"{r.same_as_ar}/{prompt_count}"
        c = r.config
        rows.append([mode_name(r), "-" if c is None or c.mode == "ar" or c.block_length is None else c.block_length,
                     f"{c.threshold:g}" if c is not None and c.mode == "diffusion" else "-", r.batch_size,
                     r.tokens, _fmt(r.nfe, "d"), _fmt(r.tpf), _fmt(r.tokens_per_step), _fmt(r.acceptance),
                     f"{r.tok_s:.1f}", speed, _fmt(None if r.ttft_s is None else r.ttft_s * 1e3, ".1f"),
                     same, _fmt(r.perplexity), _fmt(r.perplexity_vs_ar)])
    return rows


HEADER = ["mode", "L", "thr", "batch", "tokens", "NFE", "TPF", "tok/step", "accept", "tok/s", "vs ar",
          "TTFT ms", "same as ar", "PPL", "PPL vs ar"]


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table, its columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def markdown_report(bench) -> str:
    """The stdout report: run setup, the table, and acceptance by draft position."""
    s, env, m = bench.settings, bench.environment, bench.model
    cpu = f"{env['processor']} (native bf16: {'yes' if env.get('native_bf16_cpu') else 'no'})"
    lines = [f"machine: {env['cuda'] or cpu}, {env['torch_threads']} threads, torch {env['torch']}",
             f"model: {m['path']} ({m['parameters'] / 1e6:.3g}M parameters, {m['dtype']}, {m['device']}), "
             f"adapter: {m['adapter']}, quantization: {m['quantization']}",
             "default block lengths: " + ", ".join(f"{mode} {L}" for mode, L in m["block_lengths"].items() if mode != "ar")
             + (" (spec modes chosen from forwards timed at load)" if m["block_length_estimates"] else ""),
             "spec modes take AR steps from: " + (", ".join(f"{mode} {n} running" for mode, n in
                                                             m.get("spec_disable_batch_size", {}).items()) or "never"),
             f"{bench.prompt_count} prompts ({s.prompt_set}), max_new_tokens {s.max_new_tokens}, "
             f"temperature {s.temperature:g}, best of {s.repeats} round-robin run(s); "
             f"PPL: perplexity of the outputs under the AR model", "",
             format_table(table_rows(bench.results, bench.prompt_count), HEADER)]
    spec = [r for r in bench.results if r.accept_rate_by_position]
    if spec:
        lines += ["", "acceptance rate by draft position (1, 2, ...):"]
        lines += [f"  {r.name}: " + " ".join(f"{x:.2f}" for x in r.accept_rate_by_position[:16]) for r in spec]
    return "\n".join(lines)


def write_outputs(bench, out_dir: str) -> list[str]:
    """bench.json (every raw number, the environment and the command line), table.md and the PNGs."""
    import json

    from blockdiff.bench.plots import write_plots
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "table.md")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(bench.to_dict(), f, indent=1)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(f"Command: `{bench.command}`\n\n{markdown_report(bench)}\n")
    return paths + write_plots(bench.results, out_dir)
