"""Write what an evaluation measured: a markdown table, a JSON file, a PNG of accuracy vs TPF.

Accuracy and TPF sit side by side in every output, because a faster mode is only worth it at
the accuracy it keeps.
"""
from __future__ import annotations

import json
from pathlib import Path

from blockdiff.evaluation.runner import ConfigResult

KIND_NAMES = {"code": "code pass@1", "qa": "QA exact match"}


def _pct(acc: dict, kind: str, n: dict) -> str:
    return f"{100 * acc[kind]:.1f}% ({round(acc[kind] * n[kind])}/{n[kind]})" if kind in acc else "-"


def markdown_table(results: list[ConfigResult]) -> str:
    kinds = [k for k in KIND_NAMES if any(k in r.accuracy for r in results)]
    header = ["mode", "block", "threshold"] + [KIND_NAMES[k] for k in kinds] + \
        ["TPF", "tokens/step", "acceptance", "tokens", "NFE", "decode s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        s = r.summary()
        c = r.config
        spec = s["acceptance"] is not None  # tokens/step means a draft+verify cycle only in spec modes
        accept = f"{s['acceptance']:.2f}" if spec else "-"
        per_step = f"{s['tokens_per_step']:.2f}" if spec else "-"
        row = [c.mode, str(c.block_length), f"{c.threshold:g}" if c.mode == "diffusion" else "-"] + \
            [_pct(r.accuracy, k, s["n"]) for k in kinds] + \
            [f"{s['tpf']:.2f}", per_step, accept, str(s["generated_tokens"]),
             str(s["nfe"]), f"{s['wall_s']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_json(path: Path, results: list[ConfigResult], meta: dict) -> None:
    payload = {**meta, "summary": [r.summary() for r in results],
               "results": [{"config": r.config.label, "tasks": [vars(t) for t in r.tasks]} for r in results]}
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_plot(path: Path, results: list[ConfigResult], title: str) -> None:
    """Accuracy against TPF: one marker per configuration, diffusion thresholds joined as a curve."""
    import matplotlib
    matplotlib.use("Agg")  # no display; also keeps tests and servers headless
    import matplotlib.pyplot as plt

    kinds = [k for k in KIND_NAMES if any(k in r.accuracy for r in results)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        modes = list(dict.fromkeys(r.config.mode for r in results))
        for i, mode in enumerate(modes):
            rows = sorted((r for r in results if r.config.mode == mode), key=lambda r: r.tpf)
            xs, ys = [r.tpf for r in rows], [100 * r.accuracy[kind] for r in rows]
            # distinct markers and sizes: modes with the same tokens (ar, spec) often land on one point
            ax.plot(xs, ys, marker="osD^v*"[i % 6], markersize=10 - 1.5 * (i % 4), label=mode,
                    linestyle="-" if len(rows) > 1 else "none", alpha=0.85)
            if mode == "diffusion":
                for r, x, y in zip(rows, xs, ys):
                    ax.annotate(f"t={r.config.threshold:g}", (x, y), textcoords="offset points",
                                xytext=(4, 4), fontsize=8)
        ax.set_xlabel("tokens per forward (TPF)")
        ax.set_ylabel(f"{KIND_NAMES[kind]} (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
