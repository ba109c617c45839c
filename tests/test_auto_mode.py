"""mode="auto": the selector's policy, and that an auto request is lossless wherever it lands."""
from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from blockdiff.engine.auto import LOAD_BUCKETS, AutoMode, load_bucket
from blockdiff.engine.llm import LLM
from blockdiff.sampling import InvalidParameter, SamplingParams
from support.models import save_tiny_checkpoint


def feed(auto: AutoMode, mode: str, rows: int, tokens_per_s: float, steps: int = 8) -> None:
    for _ in range(steps):
        auto.record(mode, rows, int(tokens_per_s), 1.0)


def test_unmeasured_candidates_are_tried_first():
    auto = AutoMode(("ar", "linear_spec"), min_steps=3)
    assert auto.choose(1) == "ar"
    feed(auto, "ar", 1, 30, steps=3)
    assert auto.choose(1) == "linear_spec"
    feed(auto, "linear_spec", 1, 10, steps=3)
    assert auto.choose(1) == "ar"  # both measured: the faster wins


CANDIDATES = ("ar", "linear_spec", "quad_spec")
LOADS = (1, 3, 32)  # three load buckets: few enough that histories reach measured states
EVENTS = st.lists(st.one_of(
    st.tuples(st.just("step"), st.sampled_from(CANDIDATES), st.sampled_from(LOADS), st.sampled_from([10, 60, 300])),
    st.tuples(st.just("choose"), st.sampled_from(LOADS))), min_size=30, max_size=200)


def measured(auto: AutoMode, bucket: int) -> dict[str, float]:
    """Candidates with enough steps in a load bucket -> their rate, as auto.report() shows them."""
    label = f"<={LOAD_BUCKETS[bucket]}" if bucket < len(LOAD_BUCKETS) else f">{LOAD_BUCKETS[-1]}"
    stats = auto.report().get(label, {})
    return {m: v["tokens_per_s"] for m, v in stats.items() if v["steps"] >= auto.min_steps}


def lost_at_a_lower_load(auto: AutoMode, mode: str, bucket: int) -> bool:
    """A spec mode slower than the best at the nearest lower load where it and another were measured."""
    for lower in range(bucket - 1, -1, -1):
        rates = measured(auto, lower)
        if mode in rates and len(rates) > 1:
            return rates[mode] < max(rates.values())
    return False


@settings(max_examples=200, deadline=None)
@given(events=EVENTS)
@example(events=[("step", m, rows, rate) for rows in (1, 32) for m, rate in zip(CANDIDATES, (60, 10, 300))
                 for _ in range(2)] + [("choose", rows) for rows in (1, 32, 3) for _ in range(7)])
def test_the_policy_keeps_its_promises(events):
    """Whatever the history of steps and decisions: (1) a mode not yet measured in a load bucket
    is tried there by at most one request in any `probe_every` decisions (once something is
    measured; before, the first candidate takes the rest); (2) a spec mode that lost at a lower
    load is never tried at a higher one until measured there; (3) once every candidate is
    measured, the fastest is chosen, and every `refresh_every`-th decision the runner-up."""
    auto = AutoMode(CANDIDATES, min_steps=2, probe_every=5, refresh_every=3)
    decisions, probes = {}, {}
    for event in events:
        if event[0] == "step":
            _, mode, rows, tokens = event
            auto.record(mode, rows, tokens, 1.0)
            continue
        rows = event[1]
        bucket = load_bucket(rows)
        rates = measured(auto, bucket)
        lost = {m for m in CANDIDATES if m != "ar" and m not in rates and lost_at_a_lower_load(auto, m, bucket)}
        choice = auto.choose(rows)
        n = decisions[bucket] = decisions.get(bucket, 0) + 1
        assert choice in CANDIDATES and choice not in lost
        if choice not in rates and rates:
            last = probes.get((choice, bucket))
            assert last is None or n - last >= auto.probe_every
            probes[choice, bucket] = n
        if len(rates) == len(CANDIDATES):
            ranked = sorted(rates.values(), reverse=True)
            assert rates[choice] == ranked[1 if n % auto.refresh_every == 0 else 0]


def test_a_spec_mode_that_lost_at_a_lower_load_is_not_tried_at_a_higher_one():
    auto = AutoMode(("ar", "linear_spec"), refresh_every=32)
    feed(auto, "ar", 1, 30)
    feed(auto, "linear_spec", 1, 10)
    feed(auto, "ar", 32, 300)
    # neither probed nor re-tried as the runner-up: under load one try stretches a whole batch
    assert {auto.choose(32) for _ in range(64)} == {"ar"}
    # it is re-tried where it lost, when that load comes back
    assert "linear_spec" in [auto.choose(1) for _ in range(32)]
    # where speculation won alone, the larger load is still explored: it may lose there
    auto = AutoMode(("ar", "linear_spec"))
    feed(auto, "ar", 1, 30)
    feed(auto, "linear_spec", 1, 60)
    feed(auto, "ar", 32, 300)
    assert auto.choose(32) == "linear_spec"
    # and ar is never presumed slower from a lower load: a full batch is where it gains
    auto = AutoMode(("linear_spec", "ar"))
    feed(auto, "ar", 1, 30)
    feed(auto, "linear_spec", 1, 60)
    feed(auto, "linear_spec", 32, 120)
    assert auto.choose(32) == "ar"


def test_ruled_out_modes_are_neither_probed_nor_chosen():
    """A spec mode past its speculation limit would run AR steps in a group of its own."""
    auto = AutoMode(CANDIDATES)
    assert {auto.choose(16, frozenset({"quad_spec", "linear_spec"})) for _ in range(40)} == {"ar"}
    feed(auto, "ar", 16, 100)
    feed(auto, "quad_spec", 16, 300)
    assert auto.choose(16, frozenset({"quad_spec"})) in ("ar", "linear_spec")  # linear_spec is still unexplored
    assert auto.choose(16) == "quad_spec"
    spec_only = AutoMode(("linear_spec",))
    assert spec_only.choose(16, frozenset({"linear_spec"})) == "linear_spec"  # nothing else to run


def test_choice_depends_on_load():
    """Speculation can win alone and lose in a full batch (compute-bound): buckets keep apart."""
    auto = AutoMode(("ar", "linear_spec"))
    feed(auto, "ar", 1, 30)
    feed(auto, "linear_spec", 1, 60)
    feed(auto, "ar", 32, 300)
    feed(auto, "linear_spec", 32, 120)
    assert auto.choose(1) == "linear_spec"
    assert auto.choose(32) == "ar"
    assert load_bucket(1) != load_bucket(32)
    assert auto.report()[">16"]["ar"] == {"tokens_per_s": 300.0, "steps": 8}


def test_the_runner_up_is_remeasured_now_and_then():
    auto = AutoMode(("ar", "linear_spec"), refresh_every=4)
    feed(auto, "ar", 1, 30)
    feed(auto, "linear_spec", 1, 10)
    picks = [auto.choose(1) for _ in range(8)]
    assert picks.count("linear_spec") == 2 and picks.count("ar") == 6
    # a better drafter shows up in the refreshed measurements and takes over
    feed(auto, "linear_spec", 1, 90, steps=40)
    assert auto.choose(1) == "linear_spec"


def test_only_lossless_candidates():
    with pytest.raises(ValueError, match="diffusion"):
        AutoMode(("ar", "diffusion"))
    auto = AutoMode(("ar",))
    auto.record("diffusion", 1, 100, 1.0)  # other modes' steps are ignored, not an error
    assert auto.choose(1) == "ar"
    with pytest.raises(InvalidParameter, match="allowed: .*auto"):
        SamplingParams(mode="fastest")


def test_auto_generate_is_lossless_and_learns(tmp_path):
    """Whatever auto picks, greedy output equals ar's; every decode step feeds the measurements."""
    llm = LLM(save_tiny_checkpoint(tmp_path / "m"), dtype="float32", auto_modes=("ar", "linear_spec", "quad_spec"))
    llm.auto.min_steps = 2
    prompts = ["the cat sat", "def main():", "hello there", "the mat"]
    reference = [o.token_ids for o in llm.generate(prompts, max_new_tokens=12, block_length=4, use_tqdm=False)]
    chosen = set()
    for _ in range(3):
        for prompt, expected in zip(prompts, reference):
            out = llm.generate(prompt, mode="auto", max_new_tokens=12, block_length=4, use_tqdm=False)[0]
            assert out.token_ids == expected
            chosen.add(out.mode)
    assert chosen == {"ar", "linear_spec", "quad_spec"}  # each got explored at batch 1
    measured = llm.auto.report()["<=1"]
    assert set(measured) == {"ar", "linear_spec", "quad_spec"}
    assert all(m["tokens_per_s"] > 0 and m["steps"] >= 2 for m in measured.values())


def test_a_seeded_sample_under_auto_is_reproducible(tmp_path):
    """Spec modes sample other tokens from a seed than ar does, so auto must not pick one for
    a seeded sampled request, whatever it has measured."""
    llm = LLM(save_tiny_checkpoint(tmp_path / "m"), dtype="float32", auto_modes=("linear_spec", "quad_spec", "ar"))
    params = dict(max_new_tokens=12, temperature=1.0, seed=7, use_tqdm=False)
    ar = llm.generate("the cat", mode="ar", **params)[0]
    for _ in range(3):
        out = llm.generate("the cat", mode="auto", **params)[0]
        assert out.mode == "ar" and out.token_ids == ar.token_ids
    unseeded = llm.generate("the cat", mode="auto", max_new_tokens=4, temperature=1.0, use_tqdm=False)[0]
    assert unseeded.mode == "linear_spec"  # no seed to reproduce: the selector's first probe


def test_a_model_without_mask_token_only_autos_to_ar(tmp_path):
    llm = LLM(save_tiny_checkpoint(tmp_path / "m", mask_token_id=None), dtype="float32")
    out = llm.generate("the cat", mode="auto", max_new_tokens=4, use_tqdm=False)[0]
    assert out.mode == "ar" and llm.auto.candidates == ("ar",)
