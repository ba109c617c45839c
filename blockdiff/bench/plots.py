"""Three PNGs from a benchmark run: speed/quality trade-off, acceptance by draft position, tok/s."""
from __future__ import annotations

import os

from blockdiff.bench.results import Result

MODE_COLORS = {"ar": "black", "diffusion": "C1", "linear_spec": "C0", "quad_spec": "C2"}
BASELINE_COLOR = "0.6"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: benchmark machines have no display
    import matplotlib.pyplot as plt
    return plt


def _color(r: Result) -> str:
    return BASELINE_COLOR if r.config is None else MODE_COLORS.get(r.mode, "C4")


def _smallest_batch(results: list[Result]) -> list[Result]:
    """TPF, acceptance and perplexity do not depend on batch size: plot one batch size only."""
    ours = [r for r in results if r.config is not None]
    smallest = min((r.batch_size for r in ours), default=1)
    return [r for r in ours if r.batch_size == smallest]


def plot_tradeoff(results: list[Result], path: str) -> str:
    """TPF (x, higher is faster) against perplexity under the AR model (y, lower is better)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    at: dict[tuple[float, float], list[Result]] = {}  # configurations that land on the same point
    for r in _smallest_batch(results):
        if r.tpf is None or r.perplexity is None:
            continue
        is_ar = r.mode == "ar"
        ax.scatter(r.tpf, r.perplexity, color=_color(r), marker="*" if is_ar else "o", s=160 if is_ar else 40,
                   zorder=3, label=r.mode)
        at.setdefault((round(r.tpf, 3), round(r.perplexity, 3)), []).append(r)
        if is_ar:
            ax.axhline(r.perplexity, color="black", lw=0.8, ls="--", zorder=1)  # ar's quality: the bar to meet
    for (x, y), group in at.items():
        # one label per point; the colour names the mode unless several modes share the point
        one_mode = len({r.mode for r in group}) == 1
        text = ", ".join((r.name.removeprefix(r.mode).strip() if one_mode else "") or r.name for r in group)
        ax.annotate(text, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 4))
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per mode
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("perplexity of outputs under the AR model")
    ax.set_title("speed / quality trade-off (ar: star, dashed line)")
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def plot_acceptance(results: list[Result], path: str) -> str | None:
    """Acceptance rate by draft position, one line per spec-mode configuration; None if none."""
    spec = [r for r in _smallest_batch(results) if r.accept_rate_by_position]
    if not spec:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(spec):
        rates = r.accept_rate_by_position
        ax.plot(range(1, len(rates) + 1), rates, marker="o", ms=3, color=f"C{i % 10}", label=r.name)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate")
    ax.set_title("acceptance rate by draft position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_speed(results: list[Result], path: str) -> str:
    """tok/s of every configuration and baseline, bars coloured by mode (baselines grey)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(results) + 2), 4.5))
    xs = range(len(results))
    ax.bar(xs, [r.tok_s for r in results], color=[_color(r) for r in results])
    ax.set_xticks(list(xs), [r.name for r in results], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title("decoding speed (same prompts, same weights)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, plt, path)


def _save(fig, plt, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(results: list[Result], out_dir: str) -> list[str]:
    paths = [plot_tradeoff(results, os.path.join(out_dir, "tradeoff.png")),
             plot_acceptance(results, os.path.join(out_dir, "acceptance.png")),
             plot_speed(results, os.path.join(out_dir, "speed.png"))]
    return [p for p in paths if p]
