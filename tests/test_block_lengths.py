"""Per-machine block lengths: the choice from an acceptance profile and forward times, the
profile file, and an LLM that decodes at the lengths it chose (engine/block_lengths.py)."""
import pytest

from blockdiff.bench.results import Result, acceptance_profile
from blockdiff.bench.settings import RunConfig
from blockdiff.engine.block_lengths import (MAX_QUAD_BLOCK_LENGTH, NOISE, SPEC_MODES, AcceptanceProfile, batch_ladder,
                                            best_rate, candidate_lengths, choose_block_lengths, load_profile,
                                            save_profile, sequence_rate, speculation_limits)
from blockdiff.engine.llm import LLM
from blockdiff.errors import CheckpointError
from blockdiff.model.adapter import save_adapter
from blockdiff.sampling import DEFAULT_BLOCK_LENGTHS, SamplingParams
from tests.support.formats import AUTO_CANDIDATES
from tests.support.models import attach_random_draft_adapter, save_tiny_checkpoint, tiny_model

PROFILE = AcceptanceProfile({"linear_spec": [0.8, 0.4, 0.2, 0.1, 0.05], "quad_spec": [0.5, 0.2, 0.1]})


def flat_until(knee: int):
    """A forward that costs the same up to `knee` tokens, then grows with the width (an AVX2 CPU
    with fp16 weights, roughly)."""
    return lambda width, batch=1, drafting=False: max(1.0, width / knee)


def brute_force(profile, seconds, mode, widths_of):
    rate = {L: (1 + sum(profile.rates[mode][:L - 1])) / sum(seconds(w) for w in widths_of(L))
            for L in candidate_lengths(profile, mode)}
    return min(L for L in rate if rate[L] >= max(rate.values()) * (1 - NOISE))


@pytest.mark.parametrize("knee", [1, 4, 6, 12, 64])
def test_choice_maximises_expected_tokens_per_second(knee):
    seconds = flat_until(knee)
    chosen, estimates = choose_block_lengths(PROFILE, seconds)
    assert chosen["linear_spec"] == brute_force(PROFILE, seconds, "linear_spec", lambda L: [L, L])
    assert chosen["quad_spec"] == brute_force(PROFILE, seconds, "quad_spec", lambda L: [L + L * L])
    assert set(estimates["linear_spec"]) <= {2, 3, 4, 5, 6}
    # linear_spec L=3: 1 + 0.8 + 0.4 tokens from two 3-token forwards
    assert estimates["linear_spec"][3] == pytest.approx(2.2 / (2 * seconds(3)))


STRONG = AcceptanceProfile({"linear_spec": [0.9] * 11, "quad_spec": [0.9] * 5})


@pytest.mark.parametrize("profile", [PROFILE, STRONG], ids=["weak", "strong"])
@pytest.mark.parametrize("cost", ["flat", "linear", "steps of 6", "knee 12"])
def test_the_scan_stops_early_only_where_no_longer_block_can_win(profile, cost):
    """Whatever the drafter and however the forwards grow with the width (fbgemm's fp16 cost
    climbs in steps of 6 rows), the early stop chooses what timing every length would; where
    widths cost, it times fewer of the long ones."""
    seconds = {"flat": lambda w: 1.0, "linear": lambda w: float(w), "steps of 6": lambda w: float(-(-w // 6)),
               "knee 12": flat_until(12)}[cost]
    timed = []
    chosen, estimates = choose_block_lengths(profile, lambda w, batch=1, drafting=False: timed.append(w) or seconds(w))
    for mode, widths_of in (("linear_spec", lambda L: [L, L]), ("quad_spec", lambda L: [L + L * L])):
        assert chosen[mode] == brute_force(profile, seconds, mode, widths_of)
    if cost == "flat":
        assert all(set(estimates[m]) == set(candidate_lengths(profile, m)) for m in SPEC_MODES)
    if cost == "linear" and profile is PROFILE:
        assert sorted(set(timed)) == [2, 3, 6, 12]  # linear_spec L2-3, quad_spec L2-3: not L4-6, L4


def test_choice_follows_the_machine():
    """Where width is free the longest measured block wins; where it costs, a short one."""
    free, _ = choose_block_lengths(PROFILE, lambda width, batch=1, drafting=False: 1.0)
    assert free == {"linear_spec": 5, "quad_spec": 4}  # slot 5 adds 0.05 tokens to 2.5: within the noise
    costly, _ = choose_block_lengths(PROFILE, lambda width, batch=1, drafting=False: float(width))
    assert costly == {"linear_spec": 2, "quad_spec": 2}
    knee, _ = choose_block_lengths(PROFILE, flat_until(6))
    assert knee == {"linear_spec": 5, "quad_spec": 2}
    # a slot that adds less than the timing noise does not lengthen the block
    flat_tail = AcceptanceProfile({"linear_spec": [0.8, 0.4, 0.01, 0.01]})
    assert choose_block_lengths(flat_tail, lambda width, batch=1, drafting=False: 1.0)[0] == {"linear_spec": 3}


def test_candidates_stop_where_the_profile_does():
    deep = AcceptanceProfile({"quad_spec": [0.9] * 20})
    assert candidate_lengths(deep, "quad_spec")[-1] == MAX_QUAD_BLOCK_LENGTH
    assert candidate_lengths(deep, "linear_spec") == []
    chosen, estimates = choose_block_lengths(deep, lambda width, batch=1, drafting=False: 1.0)
    assert "linear_spec" not in chosen and "linear_spec" not in estimates


def test_batch_ladder_doubles_up_to_the_largest_batch():
    assert batch_ladder(64) == [2, 4, 8, 16, 32, 64]
    assert batch_ladder(48) == [2, 4, 8, 16, 32]
    assert batch_ladder(1) == []


def test_best_rate_is_the_fastest_candidate_at_its_length():
    """ar commits a token per one-token forward; linear_spec L3 2.2 tokens per two 3-token
    forwards; quad_spec L2 1.5 per 6-token forward. A mode the profile lacks counts as ar."""
    lengths = {"ar": 32, "linear_spec": 3, "quad_spec": 2}
    # an odd machine, on purpose: 3-token forwards cheaper than 1-token ones
    seconds = lambda width, batch=1, drafting=False: {1: 1.0, 3: 0.5, 6: 1.2}[width]  # noqa: E731
    assert sequence_rate(PROFILE, "linear_spec", 3, seconds) == pytest.approx(2.2)
    assert best_rate(PROFILE, lengths, ("ar", "linear_spec", "quad_spec"), seconds) == pytest.approx(2.2)
    assert best_rate(PROFILE, lengths, ("ar", "quad_spec"), seconds) == pytest.approx(1.25)
    assert best_rate(None, lengths, ("ar", "linear_spec"), seconds) == 1.0
    linear_only = AcceptanceProfile({"linear_spec": PROFILE.rates["linear_spec"]})
    assert best_rate(linear_only, lengths, ("quad_spec",), seconds) == 1.0
    assert PROFILE.most_tokens_per_step() == pytest.approx(2.55)
    # draft passes run the adapter and are timed with it: linear_spec's draft, quad_spec's only pass
    drafting_dearer = lambda width, batch=1, drafting=False: 1.0 + drafting  # noqa: E731
    assert sequence_rate(PROFILE, "linear_spec", 3, drafting_dearer) == pytest.approx(2.2 / 3)
    assert sequence_rate(PROFILE, "quad_spec", 2, drafting_dearer) == pytest.approx(1.5 / 2)


def test_auto_quantization_weighs_the_spec_modes_at_the_lengths_it_would_choose(tiny_with_profile):
    """Each format's expected rate is the best of auto's modes at that format's own block
    lengths; the model keeps the winner, and its lengths are chosen from the winner's timings."""
    model_dir, adapter = tiny_with_profile
    llm = LLM(model_dir, dtype="float32", adapter=adapter, quantization="auto")
    rates = llm.quantization_rates
    assert set(rates) == AUTO_CANDIDATES and llm.model.quantization == max(rates, key=rates.get)
    estimates = llm.block_length_estimates
    chosen_spec = max(estimates[m][llm.block_lengths[m]] for m in ("linear_spec", "quad_spec"))
    assert rates[llm.model.quantization] >= chosen_spec  # ar may be faster still
    ar = llm.generate([5, 9, 14], SamplingParams(max_new_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    spec = llm.generate([5, 9, 14], SamplingParams(mode="quad_spec", max_new_tokens=16, ignore_eos=True),
                        use_tqdm=False)[0]
    assert spec.token_ids == ar.token_ids


def test_speculation_stops_where_the_batch_uses_up_the_spare_compute():
    """With forwards flat up to 16 tokens in all, linear_spec L3 (two 3-token passes, 2.2
    tokens a step) still wins at 4 rows (12 tokens a pass) and loses at 8 (24), quad_spec L2
    (one 6-token pass, 1.5 tokens a step) loses at 4 rows already."""
    lengths = {"linear_spec": 3, "quad_spec": 2}
    knee = lambda width, batch=1, drafting=False: max(1.0, width * batch / 16)  # noqa: E731
    assert speculation_limits(PROFILE, lengths, knee, max_batch=64) == {"linear_spec": 8, "quad_spec": 4}
    assert speculation_limits(PROFILE, lengths, knee, max_batch=4) == {"quad_spec": 4}
    free = lambda width, batch=1, drafting=False: 1.0  # noqa: E731
    assert speculation_limits(PROFILE, lengths, free, max_batch=64) == {}  # width is free
    costly = lambda width, batch=1, drafting=False: float(width * batch)  # noqa: E731
    assert speculation_limits(PROFILE, lengths, costly, max_batch=64) == {"linear_spec": 2, "quad_spec": 2}
    linear_only = AcceptanceProfile({"linear_spec": PROFILE.rates["linear_spec"]})
    assert speculation_limits(linear_only, lengths, costly, max_batch=64) == {"linear_spec": 2}


def test_profile_round_trips_and_bad_files_name_themselves(tmp_path):
    profile = AcceptanceProfile({"linear_spec": [0.75, 0.5], "quad_spec": [0.4]}, measured="by hand")
    save_profile(tmp_path, profile)
    assert load_profile(tmp_path) == profile
    assert load_profile(tmp_path / "nowhere") is None
    (tmp_path / "acceptance.json").write_text('{"linear_spec": [0.5, 1.5]}')
    with pytest.raises(CheckpointError, match=r"acceptance.json: linear_spec rates must be fractions"):
        load_profile(tmp_path)
    (tmp_path / "acceptance.json").write_text('{"linear_spec": 3}')
    with pytest.raises(CheckpointError, match="acceptance.json: not an acceptance profile"):
        load_profile(tmp_path)


def test_bench_profile_takes_each_modes_deepest_run():
    def result(mode, L, rates, kind="blockdiff"):
        r = Result(f"{mode} L{L}", kind, 1, RunConfig(mode, L, 0.9, 1), 10, 1.0, 10.0)
        r.accept_rate_by_position = rates
        return r
    results = [result("ar", 32, []), result("linear_spec", 4, [0.8, 0.4, 0.2]),
               result("linear_spec", 8, [0.81, 0.39, 0.21, 0.1, 0.05, 0.01, 0.0]),
               result("quad_spec", 3, [0.5, 0.2]), result("diffusion", 8, [])]
    profile = acceptance_profile(results, "test")
    assert profile.rates == {"linear_spec": [0.81, 0.39, 0.21, 0.1, 0.05, 0.01, 0.0], "quad_spec": [0.5, 0.2]}


@pytest.fixture(scope="module")
def tiny_with_profile(tmp_path_factory):
    root = tmp_path_factory.mktemp("profiled")
    model_dir = save_tiny_checkpoint(root / "model", seed=3)
    adapted = attach_random_draft_adapter(LLM(model_dir, dtype="float32").model)
    save_adapter(adapted, root / "adapter")
    save_profile(root / "adapter", PROFILE)
    return model_dir, str(root / "adapter")


def test_llm_chooses_from_the_adapters_profile_and_decodes_at_it(tiny_with_profile):
    model_dir, adapter = tiny_with_profile
    llm = LLM(model_dir, dtype="float32", adapter=adapter, auto_modes=("linear_spec", "ar"))
    assert set(llm.block_length_estimates) == {"linear_spec", "quad_spec"}
    for mode in ("linear_spec", "quad_spec"):
        estimates, chosen = llm.block_length_estimates[mode], llm.block_lengths[mode]
        good_enough = [L for L, rate in estimates.items() if rate >= max(estimates.values()) * (1 - NOISE)]
        assert chosen == min(good_enough)
    assert llm.block_lengths["diffusion"] == DEFAULT_BLOCK_LENGTHS["diffusion"]
    prompt = [5, 9, 14, 42]
    auto = llm.generate(prompt, SamplingParams(mode="auto", max_new_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    assert auto.mode == "linear_spec"  # nothing measured yet: the first candidate is probed
    assert len(auto.metrics.drafted_by_position) == llm.block_lengths["linear_spec"] - 1  # the chosen mode's length
    ar = llm.generate(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    for mode in ("linear_spec", "quad_spec"):
        out = llm.generate(prompt, SamplingParams(mode=mode, max_new_tokens=24, ignore_eos=True), use_tqdm=False)[0]
        assert out.token_ids == ar.token_ids  # lossless at whatever length was chosen
        assert len(out.metrics.drafted_by_position) == llm.block_lengths[mode] - 1  # draft slots per step
        assert out.block_length == llm.block_lengths[mode]  # and the output says which it was


def test_explicit_block_lengths_win_and_bad_ones_are_refused(tiny_with_profile):
    model_dir, adapter = tiny_with_profile
    llm = LLM(model_dir, dtype="float32", adapter=adapter, block_lengths={"linear_spec": 3})
    assert llm.block_lengths == DEFAULT_BLOCK_LENGTHS | {"linear_spec": 3} and llm.block_length_estimates is None
    out = llm.generate([5, 9], SamplingParams(mode="linear_spec", max_new_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.metrics.drafted_by_position) == 2
    explicit = llm.generate([5, 9], SamplingParams(mode="linear_spec", max_new_tokens=12, ignore_eos=True,
                                                   block_length=5), use_tqdm=False)[0]
    assert len(explicit.metrics.drafted_by_position) == 4
    for bad in ({"linear": 4}, {"quad_spec": 0}, {"ar": True}):
        with pytest.raises(ValueError, match="block_lengths maps modes"):
            LLM(model_dir, dtype="float32", adapter=adapter, block_lengths=bad)
    with pytest.raises(ValueError, match="block_lengths must be 'auto'"):
        LLM(model_dir, dtype="float32", adapter=adapter, block_lengths="fast")


def test_without_a_profile_the_defaults_stand(tmp_path):
    model_dir = save_tiny_checkpoint(tmp_path / "model", seed=3)
    llm = LLM(model_dir, dtype="float32")
    assert llm.block_lengths == DEFAULT_BLOCK_LENGTHS and llm.block_length_estimates is None
    assert llm.spec_limits == {}  # nothing says where speculation stops paying: it never stops


def test_spec_disable_batch_size_is_measured_set_or_off(tiny_with_profile):
    model_dir, adapter = tiny_with_profile
    measured = LLM(model_dir, dtype="float32", adapter=adapter, max_batch_size=8)
    assert set(measured.spec_limits) <= {"linear_spec", "quad_spec"}
    assert all(limit in batch_ladder(8) for limit in measured.spec_limits.values())
    fixed = LLM(model_dir, dtype="float32", adapter=adapter, spec_disable_batch_size=4, block_lengths={})
    assert fixed.spec_limits == {"linear_spec": 4, "quad_spec": 4}
    assert LLM(model_dir, dtype="float32", adapter=adapter, spec_disable_batch_size=None).spec_limits == {}
    for bad in (1, 0, "never", 2.5, True):
        with pytest.raises(ValueError, match="spec_disable_batch_size must be 'auto', None"):
            LLM(model_dir, dtype="float32", adapter=adapter, spec_disable_batch_size=bad)
    prompts = [[5, 9, 14, 42], [7, 3], [11, 2, 8], [4]]
    greedy = dict(max_new_tokens=16, ignore_eos=True)
    ar = fixed.generate(prompts, SamplingParams(**greedy), use_tqdm=False)
    for mode in ("linear_spec", "quad_spec"):
        outs = fixed.generate(prompts, SamplingParams(mode=mode, **greedy), use_tqdm=False)
        assert [o.token_ids for o in outs] == [o.token_ids for o in ar]
        assert all(o.metrics.verify_steps == 0 for o in outs)  # four rows running: AR steps only


def test_server_reports_and_uses_the_engines_lengths(tiny_with_profile):
    import httpx

    from tests.support.server import serving
    model_dir, adapter = tiny_with_profile
    llm = LLM(model_dir, dtype="float32", adapter=adapter)
    with serving(llm) as server:  # no --block-length: each mode's engine default
        assert httpx.get(server.url + "/get_server_info").json()["block_length"] == llm.block_lengths
        body = {"model": "model", "prompt": [5, 9, 14], "max_tokens": 8, "temperature": 0, "mode": "quad_spec"}
        reply = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
