"""Each spec mode's default block length on this machine, from the drafter's measured
acceptance and this machine's measured forwards.

A `linear_spec` step runs a draft pass and a verify pass of L tokens and commits
1 + a_1 + ... + a_{L-1} tokens on average, a_i being the fraction of steps whose draft slot i
was accepted; a `quad_spec` step runs one pass of L + L*L tokens and commits
1 + q_1 + ... + q_{L-1}. The best L is the one with the most tokens per second of forward
time, and it depends on the machine as much as on the drafter: on an AMX Xeon a 32-token
forward costs 1.3x a one-token one, so long blocks are nearly free, while on an AVX2 CPU with
fp16 weights the cost is flat up to 6 tokens and then climbs (benchmarks/RESULTS.md). So the
acceptance is measured once, on held-out prompts, and shipped with the adapter
(acceptance.json, written by `blockdiff bench --save-acceptance`), and the forwards are timed
when the model loads, as `quantization="auto"` does.

The same numbers say where speculation stops paying: a step of B sequences runs B times the
tokens of each pass, and a CPU has compute to spare for a few rows only, so past some batch
size a spec mode commits fewer tokens per second than plain AR steps. `speculation_limits`
finds that batch size per mode, and the scheduler takes plain AR steps for a spec mode's
groups while that many sequences run (vLLM's `disable_by_batch_size`, measured rather than
configured).

The choices change no greedy token (the spec modes emit `ar`'s tokens at any L, and an AR
step is the verifier's own step), only speed. Only lengths whose every slot was measured are
candidates: past the profile the acceptance is unknown. A model whose adapter has no profile
keeps sampling.DEFAULT_BLOCK_LENGTHS and speculates at every batch size.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from blockdiff.errors import CheckpointError
from blockdiff.model.autotune import Seconds, forward_width

PROFILE_FILE = "acceptance.json"
SPEC_MODES = ("linear_spec", "quad_spec")
NOISE = 0.03  # relative spread of forward timings at load on a quiet machine
MAX_QUAD_BLOCK_LENGTH = 6  # a 42-token fused pass; longer ones only pay on hardware with compute to spare


@dataclass
class AcceptanceProfile:
    """acceptance.json in a draft adapter's directory:

        {"linear_spec": [0.82, 0.39, 0.20, ...], "quad_spec": [0.46, 0.19, 0.08],
         "measured": "how: command, prompts, date"}

    Entry i of a mode's list is the fraction of its draft+verify steps whose draft slot i+1
    was accepted, at temperature 0 (what `blockdiff bench` prints as "acceptance rate by draft
    position"). A mode may be missing."""
    rates: dict[str, list[float]]
    measured: str = ""

    def tokens_per_step(self, mode: str, block_length: int) -> float:
        return 1.0 + sum(self.rates[mode][:block_length - 1])

    def most_tokens_per_step(self) -> float:
        """What a step of any mode commits at most on average: every measured slot drafted."""
        return max((1.0 + sum(rates) for rates in self.rates.values()), default=1.0)

    def to_json(self) -> str:
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in (self.rates | {"measured": self.measured}).items()]
        return "{\n" + ",\n".join(lines) + "\n}\n"


def load_profile(adapter_dir: str | Path) -> AcceptanceProfile | None:
    """The adapter's acceptance profile; None when it ships none. A malformed file is an error."""
    path = Path(adapter_dir) / PROFILE_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        rates = {m: [float(x) for x in raw[m]] for m in SPEC_MODES if m in raw}
        measured = str(raw.get("measured", ""))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not an acceptance profile ({e})") from None
    bad = [m for m, r in rates.items() if not all(0.0 <= x <= 1.0 for x in r)]
    if bad:
        raise CheckpointError(f"{path}: {bad[0]} rates must be fractions in [0, 1]")
    return AcceptanceProfile(rates, measured)


def save_profile(adapter_dir: str | Path, profile: AcceptanceProfile) -> Path:
    path = Path(adapter_dir) / PROFILE_FILE
    path.write_text(profile.to_json())
    return path


def passes(mode: str, block_length: int) -> list[tuple[int, bool]]:
    """(tokens per sequence, whether the draft adapter runs) of each forward in one step of
    `mode`: linear_spec drafts, then verifies; quad_spec does both in one pass."""
    width = forward_width(mode, block_length)
    return [(width, True), (width, False)] if mode == "linear_spec" else [(width, True)]


def candidate_lengths(profile: AcceptanceProfile, mode: str) -> list[int]:
    """Block lengths 2.. whose draft slots were all measured (quad_spec up to MAX_QUAD_BLOCK_LENGTH)."""
    longest = len(profile.rates.get(mode, [])) + 1
    if mode == "quad_spec":
        longest = min(longest, MAX_QUAD_BLOCK_LENGTH)
    return list(range(2, longest + 1))


def sequence_rate(profile: AcceptanceProfile, mode: str, block_length: int, seconds: Seconds, batch: int = 1) -> float:
    """Expected tokens per second each sequence of a batch of `batch` commits in `mode` ("ar" or
    a spec mode the profile covers) at `block_length`, counting forward time only."""
    if mode == "ar":
        return 1.0 / seconds(1, batch)
    step_seconds = sum(seconds(width, batch, drafting) for width, drafting in passes(mode, block_length))
    return profile.tokens_per_step(mode, block_length) / step_seconds


def best_rate(profile: AcceptanceProfile | None, block_lengths: dict[str, int], modes, seconds: Seconds) -> float:
    """The highest `sequence_rate` at batch 1 among `modes`; a spec mode the profile does not
    cover (or with no profile) has no estimate and counts as `ar`, the steps it falls back to
    when it stops paying."""
    covered = [m for m in modes if m in SPEC_MODES and profile is not None and m in profile.rates]
    return max(sequence_rate(profile, m, block_lengths[m], seconds) for m in ["ar", *covered])


def choose_block_lengths(profile: AcceptanceProfile, seconds: Seconds
                         ) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
    """-> ({mode: the block length with the most expected tokens per second, or the shortest
    within NOISE of it},
    {mode: {block length: expected tokens per second}}), for the spec modes the profile covers;
    `seconds(width, batch=1, drafting=False)` times one decode forward (model/autotune.py).

    Lengths are timed shortest first, and a mode's scan stops once a longer block could not
    come within NOISE of the best so far even committing the profile's longest draft: its
    passes cost no less than this length's. The longest blocks are the dearest to time."""
    chosen, estimates = {}, {}
    for mode in SPEC_MODES:
        lengths = candidate_lengths(profile, mode)
        if not lengths:
            continue
        most = profile.tokens_per_step(mode, lengths[-1])
        estimates[mode] = {}
        for L in lengths:
            rate = estimates[mode][L] = sequence_rate(profile, mode, L, seconds)
            if rate * most / profile.tokens_per_step(mode, L) < max(estimates[mode].values()) * (1 - NOISE):
                break
        best = max(estimates[mode].values())
        # within timing noise of the best, the shortest: it costs least when batches fill up
        chosen[mode] = min(L for L, rate in estimates[mode].items() if rate >= best * (1 - NOISE))
    return chosen, estimates


SPEC_DISABLE_HELP = ("while this many sequences run, the spec modes take plain AR steps (the same tokens at "
                     "temperature 0): auto: where speculation was measured to stop paying on this machine "
                     "(engine/block_lengths.py), never, or a batch size >= 2")


def check_spec_disable_batch_size(setting: str | int | None) -> str | int | None:
    """LLM's spec_disable_batch_size argument: "auto", None (never) or a batch size >= 2."""
    if setting in ("auto", None) or (isinstance(setting, int) and not isinstance(setting, bool) and setting >= 2):
        return setting
    raise ValueError(f"spec_disable_batch_size must be 'auto', None (never) or an integer >= 2, got {setting!r}")


def spec_disable_batch_size_arg(text: str) -> str | int | None:
    """The CLI's --spec-disable-batch-size: auto, never or an integer >= 2."""
    if text == "never":
        return None
    try:
        return check_spec_disable_batch_size(text if text == "auto" else int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, never or an integer >= 2, got {text!r}") from None


def batch_ladder(max_batch: int) -> list[int]:
    """The batch sizes where speculation is weighed against AR: 2, 4, 8, ... up to max_batch."""
    return [2 ** k for k in range(1, max_batch.bit_length()) if 2 ** k <= max_batch]


def speculation_limits(profile: AcceptanceProfile, block_lengths: dict[str, int], seconds: Seconds,
                       max_batch: int) -> dict[str, int]:
    """-> {spec mode: the smallest batch size of `batch_ladder(max_batch)` at which the mode, at
    its block length, is not expected to beat AR steps by more than NOISE}, for the modes the
    profile covers; a mode that wins at every size is left out. At batch 1 speculation is
    what the request asked for, so it is never weighed there. Each mode stops at the first
    size it loses: a fuller batch leaves less compute to spare."""
    limits = {}
    for mode in SPEC_MODES:
        if mode not in profile.rates:
            continue
        L = block_lengths[mode]
        for batch in batch_ladder(max_batch):
            ar_rate = sequence_rate(profile, "ar", 1, seconds, batch)
            if sequence_rate(profile, mode, L, seconds, batch) <= (1 + NOISE) * ar_rate:
                limits[mode] = batch
                break
    return limits
