"""One timed run's outputs, and the numbers the report shows for it (SPEC section 6 metrics)."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from blockdiff.bench.settings import REFERENCE_MODE, RunConfig
from blockdiff.decoding.metrics import Metrics
from blockdiff.engine.block_lengths import SPEC_MODES, AcceptanceProfile


@dataclass
class Sample:
    """One prompt's output in a timed run."""
    token_ids: list[int]
    mode: str | None = None  # the mode that decoded it ("auto" resolves per request); None for a baseline
    metrics: Metrics | None = None  # None for a baseline: transformers reports no NFE
    nll: float | None = None  # summed nats of token_ids under the AR model, filled in by quality.py
    same_as_ar: bool | None = None

    def to_dict(self) -> dict:
        return {"token_ids": self.token_ids, "mode": self.mode, "nll": self.nll, "same_as_ar": self.same_as_ar,
                "metrics": None if self.metrics is None else self.metrics.to_dict()}


@dataclass
class Run:
    samples: list[Sample]
    wall_s: float  # every batch's generate call, end to end (prefill included), summed


@dataclass
class Result:
    name: str
    kind: str  # "blockdiff" (one of our configurations) or "baseline" (transformers)
    batch_size: int
    config: RunConfig | None
    tokens: int
    wall_s: float
    tok_s: float
    resolved_modes: dict[str, int] = field(default_factory=dict)
    nfe: int | None = None
    tpf: float | None = None
    steps: int | None = None
    tokens_per_step: float | None = None
    acceptance: float | None = None  # mean tokens committed per verify step, bonus included
    accept_rate_by_position: list[float] = field(default_factory=list)  # index i: draft position i+1
    ttft_s: float | None = None  # mean over prompts
    same_as_ar: int | None = None  # prompts whose tokens equal ar's exactly
    same_as_ar_fraction: float | None = None
    perplexity: float | None = None  # of the generated tokens under the AR model (adapter off)
    perplexity_vs_ar: float | None = None
    samples: list[Sample] = field(default_factory=list)

    @property
    def mode(self) -> str | None:
        return None if self.config is None else self.config.mode

    def to_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k not in ("config", "samples")}
        d["config"] = None if self.config is None else vars(self.config).copy()
        d["samples"] = [s.to_dict() for s in self.samples]
        return d


def _sum_by_position(lists: list[list[int]]) -> list[int]:
    """Element-wise sum of ragged per-sequence lists (sequences drafted different depths)."""
    width = max((len(x) for x in lists), default=0)
    return [sum(x[i] for x in lists if i < len(x)) for i in range(width)]


def summarize(name: str, kind: str, batch_size: int, config: RunConfig | None, run: Run) -> Result:
    tokens = sum(len(s.token_ids) for s in run.samples)
    result = Result(name, kind, batch_size, config, tokens, run.wall_s,
                    tokens / run.wall_s if run.wall_s > 0 else 0.0, samples=run.samples)
    ms = [s.metrics for s in run.samples if s.metrics is not None]
    if not ms:
        return result
    result.resolved_modes = dict(Counter(s.mode for s in run.samples))
    result.nfe = sum(m.nfe for m in ms)
    result.tpf = tokens / result.nfe if result.nfe else None
    result.steps = sum(m.steps for m in ms)
    result.tokens_per_step = tokens / result.steps if result.steps else None
    verify = sum(m.verify_steps for m in ms)
    result.acceptance = sum(m.committed_in_verify for m in ms) / verify if verify else None
    drafted = _sum_by_position([m.drafted_by_position for m in ms])
    accepted = _sum_by_position([m.accepted_by_position for m in ms])
    # positions are drafted in order, so the first never-drafted position ends the list
    result.accept_rate_by_position = [a / d for a, d in zip(accepted, drafted) if d]
    result.ttft_s = sum(m.ttft_s for m in ms) / len(ms)
    return result


def acceptance_profile(results: list[Result], measured: str) -> AcceptanceProfile:
    """Each spec mode's acceptance by draft position, from its run that drafted deepest (the
    adapter's acceptance.json; engine/block_lengths.py)."""
    rates = {}
    for mode in SPEC_MODES:
        runs = [r for r in results if r.kind == "blockdiff" and r.mode == mode and r.accept_rate_by_position]
        if runs:
            deepest = max(runs, key=lambda r: len(r.accept_rate_by_position))
            rates[mode] = [round(x, 4) for x in deepest.accept_rate_by_position]
    return AcceptanceProfile(rates, measured)


def reference_for(result: Result, results: list[Result]) -> Result | None:
    """ar at the same batch size (our engine promises batch-independent tokens, but in bf16 a
    batched kernel may round differently); failing that, ar at the smallest batch size."""
    refs = sorted((r for r in results if r.kind == "blockdiff" and r.mode == REFERENCE_MODE),
                  key=lambda r: (r.batch_size != result.batch_size, r.batch_size))
    return refs[0] if refs else None


def compare_with_ar(results: list[Result]) -> None:
    """Fill same_as_ar and perplexity_vs_ar in place (perplexities must be set already)."""
    for r in results:
        ref = reference_for(r, results)
        if ref is None or (r is ref):
            continue
        for s, s_ref in zip(r.samples, ref.samples):
            s.same_as_ar = s.token_ids == s_ref.token_ids
        r.same_as_ar = sum(bool(s.same_as_ar) for s in r.samples)
        r.same_as_ar_fraction = r.same_as_ar / len(r.samples) if r.samples else None
        if r.perplexity is not None and ref.perplexity:
            r.perplexity_vs_ar = r.perplexity / ref.perplexity


def perplexity_of(samples: list[Sample]) -> float | None:
    """exp(total NLL / total tokens): token-weighted, so long outputs count for what they are."""
    n = sum(len(s.token_ids) for s in samples if s.nll is not None)
    return math.exp(sum(s.nll for s in samples if s.nll is not None) / n) if n else None
