"""`blockdiff plot-train RUN_DIR`: AR and diffusion loss curves from metrics.jsonl to a PNG."""
from __future__ import annotations

import os

from blockdiff.train.metrics import read_metrics


def plot_run(run_dir: str, out: str | None = None, smooth: int = 1) -> str:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: metrics.jsonl has no records yet")
    out = out or os.path.join(run_dir, "loss.png")

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        steps, values = [s for s, _ in pts], [v for _, v in pts]
        if smooth > 1 and values:  # trailing mean: noisy per-step losses are hard to read
            values = [sum(values[max(0, i - smooth + 1): i + 1]) / len(values[max(0, i - smooth + 1): i + 1])
                      for i in range(len(values))]
        return steps, values

    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {"ar_loss": ("AR (train)", "C0", "-"), "diff_loss": ("diffusion (train)", "C1", "-"),
              "val_ar_loss": ("AR (validation)", "C0", "--"), "val_diff_loss": ("diffusion (validation)", "C1", "--")}
    for key, (label, color, line) in styles.items():
        steps, values = series(key)
        if values:
            ax.plot(steps, values, line, color=color, label=label, marker="o" if len(values) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"{os.path.basename(os.path.abspath(run_dir))}: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
