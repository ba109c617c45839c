"""mode="auto": the selector's policy, and that an auto request is lossless wherever it lands."""
from __future__ import annotations

import pytest

from blockdiff.engine.auto import AutoMode, load_bucket
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


def test_a_burst_of_newcomers_costs_one_probe_per_candidate():
    """32 requests placed before any step is measured: one tries each mode, the rest take the
    first candidate, and an unexplored mode is re-probed only every `probe_every` decisions."""
    auto = AutoMode(("ar", "linear_spec"), probe_every=16)
    wave = [auto.choose(32) for _ in range(32)]
    assert wave[:2] == ["ar", "linear_spec"] and wave.count("linear_spec") == 2  # decisions 2 and 18
    feed(auto, "ar", 32, 300)  # ar measured, linear_spec's probes still running: the rest go to ar
    later = [auto.choose(32) for _ in range(16)]  # decisions 33..48
    assert later.count("linear_spec") == 1 and later[1] == "linear_spec"  # decision 34 = 18 + 16
    feed(auto, "linear_spec", 32, 120)
    assert auto.choose(32) == "ar"


def test_a_spec_mode_that_lost_at_a_lower_load_is_not_tried_at_a_higher_one():
    auto = AutoMode(("ar", "linear_spec"), refresh_every=32)
    feed(auto, "ar", 1, 30)
    feed(auto, "linear_spec", 1, 10)
    feed(auto, "ar", 32, 300)
    # neither probed nor re-tried as the runner-up: under load one try stretches a whole batch
    assert {auto.choose(32) for _ in range(64)} == {"ar"}
    # it is re-tried where it lost, when that load comes back
    picks = [auto.choose(1) for _ in range(32)]
    assert [i + 1 for i, m in enumerate(picks) if m == "linear_spec"] == [32]
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


def test_a_model_without_mask_token_only_autos_to_ar(tmp_path):
    llm = LLM(save_tiny_checkpoint(tmp_path / "m", mask_token_id=None), dtype="float32")
    out = llm.generate("the cat", mode="auto", max_new_tokens=4, use_tqdm=False)[0]
    assert out.mode == "ar" and llm.auto.candidates == ("ar",)
