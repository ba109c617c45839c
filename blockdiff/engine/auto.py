"""mode="auto": pick the fastest lossless mode from measured throughput at the current load.

Self-speculation pays only when the draft is accepted often enough to cover a step that
costs two block-wide forwards, and only while the hardware has compute to spare: a CPU at
batch 32, or a model without a trained drafter, makes `linear_spec` slower than `ar`.
Neither can be known in advance, so the selector measures. Every decode step of every mode
reports (load, tokens committed, seconds); tokens per second of step time, an EMA per
(mode, load bucket), is the score. Load is the number of sequences running, across all
modes, both when a step is recorded and when a request is placed: otherwise a mode tried by
a few requests amid many would only ever be measured at a small load, and stay "unexplored"
at the large one. The price is a bias toward the mode that already holds most rows (its
batch is fuller), which under load is the safe side: speculation is what needs spare compute.

- Only lossless candidates (`ar` and the spec modes): at temperature 0 an auto request's
  output equals `ar`'s whatever is chosen.
- A candidate with too few measured steps in the bucket is explored by one request, then by
  at most one in every `probe_every` decisions until it has them; the requests in between go
  to the best measured candidate (the first candidate while none is measured). A burst of
  newcomers thus costs one probe, not a whole wave decoded in a slow mode. Every
  `refresh_every`-th decision re-tries the best of the others, so a drafter that improves or a
  workload that changes is noticed.
- A spec mode that lost at a lower load is neither probed nor re-tried at a higher one:
  speculation spends spare compute, and a fuller batch leaves less of it, so it only loses
  more. Under load a try is dear: one slow request stretches every step of the batch it joins
  (measured on the trained `tiny` at 32 streams: `auto` reached 0.55x `ar` when it probed
  there, 0.81x when it only re-tried the runner-up). Such a mode is re-tried at the load
  where it lost, whenever that load comes back.
- A spec mode that the scheduler would run as AR steps at the load (its speculation limit,
  engine/block_lengths.py) is not a candidate there.
- The choice is made once per request, when it is scheduled; a sequence never switches mode.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

LOSSLESS = ("ar", "linear_spec", "quad_spec")
LOAD_BUCKETS = (1, 4, 16)  # rows <= 1, <= 4, <= 16, more


def load_bucket(rows: int) -> int:
    return next((i for i, limit in enumerate(LOAD_BUCKETS) if rows <= limit), len(LOAD_BUCKETS))


@dataclass
class Throughput:
    tokens_per_s: float = 0.0  # EMA over steps
    steps: int = 0


@dataclass
class AutoMode:
    candidates: tuple[str, ...] = LOSSLESS
    min_steps: int = 8  # steps a candidate needs in a bucket before its EMA is trusted
    refresh_every: int = 32  # every Nth decision in a bucket re-measures a runner-up
    probe_every: int = 16  # an unexplored candidate gets at most one request per this many decisions
    smoothing: float = 0.1  # EMA weight of a new step
    stats: dict[tuple[str, int], Throughput] = field(default_factory=dict)
    decisions: dict[int, int] = field(default_factory=dict)
    probed_at: dict[tuple[str, int], int] = field(default_factory=dict)  # decision number of the last probe
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        bad = [m for m in self.candidates if m not in LOSSLESS]
        if bad or not self.candidates:
            raise ValueError(f"auto mode candidates must be among {', '.join(LOSSLESS)}, got {list(self.candidates)}")

    def record(self, mode: str, rows: int, tokens: int, seconds: float) -> None:
        """One decode step of `rows` sequences in `mode` committed `tokens` in `seconds`."""
        if mode not in self.candidates or seconds <= 0:
            return
        with self.lock:
            stat = self.stats.setdefault((mode, load_bucket(rows)), Throughput())
            rate = tokens / seconds
            weight = 1.0 if stat.steps == 0 else self.smoothing
            stat.tokens_per_s += weight * (rate - stat.tokens_per_s)
            stat.steps += 1

    def choose(self, rows: int, ruled_out: frozenset[str] = frozenset()) -> str:
        """The mode for a request that will be decoded alongside about `rows` sequences, among
        the candidates not `ruled_out` (spec modes that would take AR steps at this load: as a
        group of their own they would only add forwards), or all of them if none is left."""
        bucket = load_bucket(rows)
        candidates = [m for m in self.candidates if m not in ruled_out] or list(self.candidates)
        with self.lock:
            n = self.decisions[bucket] = self.decisions.get(bucket, 0) + 1
            measured = {m: self.stats.get((m, bucket), Throughput()) for m in candidates}
            explored = [m for m in candidates if measured[m].steps >= self.min_steps]
            presumed_slower = [m for m in candidates if m not in explored and self._lost_below(m, bucket)]
            for m in candidates:
                last = self.probed_at.get((m, bucket))
                if m not in explored and m not in presumed_slower and (last is None or n - last >= self.probe_every):
                    self.probed_at[(m, bucket)] = n
                    return m
            if not explored:
                return candidates[0]  # probes are out; the rest wait on no measurement
            ranked = sorted(explored, key=lambda m: measured[m].tokens_per_s, reverse=True)
            if len(ranked) > 1 and n % self.refresh_every == 0:
                return ranked[1]
            return ranked[0]

    def _lost_below(self, mode: str, bucket: int) -> bool:
        """Whether spec mode `mode` was slower than the best candidate at the nearest lower load
        where both were measured (called with the lock held)."""
        if mode == "ar":
            return False  # ar only gains from a fuller batch
        for lower in range(bucket - 1, -1, -1):
            rates = {m: self.stats[(m, lower)].tokens_per_s for m in self.candidates
                     if (m, lower) in self.stats and self.stats[(m, lower)].steps >= self.min_steps}
            if mode in rates and len(rates) > 1:
                return rates[mode] < max(rates.values())
        return False

    def report(self) -> dict:
        """{bucket label: {mode: {"tokens_per_s", "steps"}}} for /get_server_info and benchmarks."""
        labels = [f"<={b}" for b in LOAD_BUCKETS] + [f">{LOAD_BUCKETS[-1]}"]
        with self.lock:
            out: dict[str, dict] = {}
            for (mode, bucket), stat in sorted(self.stats.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                out.setdefault(labels[bucket], {})[mode] = {"tokens_per_s": round(stat.tokens_per_s, 2),
                                                            "steps": stat.steps}
            return out
