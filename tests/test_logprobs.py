"""Log-probabilities of emitted and prompt tokens: equal to a full causal recompute, and the
same in every lossless mode (decoding/logprobs.py)."""
import pytest
import torch

from support.models import attach_random_draft_adapter, causal_logprobs, run, tiny_model
from blockdiff.sampling import InvalidParameter, SamplingParams

PROMPTS = [[1, 2, 3, 4, 5], [7], [3] * 13, [9, 8]]


def inference_model(seed: int):
    """A tiny model with a draft adapter, packed as LLM packs its models (the packed products
    are the width-invariant ones)."""
    model = attach_random_draft_adapter(tiny_model(seed, vocab=24))
    model.prepare_for_inference()
    return model


@pytest.mark.parametrize("mode", ["ar", "linear_spec", "quad_spec"])
def test_output_logprobs_equal_a_full_recompute(mode):
    model = inference_model(3)
    for seq in run(model, PROMPTS, eos=4, mode=mode, max_new_tokens=17, block_length=4, logprobs=3):
        assert [lp.token_id for lp in seq.logprobs] == seq.output_ids
        full = causal_logprobs(model, seq.prompt_ids + seq.output_ids)
        P = len(seq.prompt_ids)
        for i, lp in enumerate(seq.logprobs):
            row = full[P - 1 + i]  # the prediction for output token i
            assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
            values, ids = row.topk(3)
            assert [t for t, _ in lp.top] == ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_every_lossless_mode_reports_the_same_numbers(temperature):
    """At temperature 0 the spec modes emit ar's tokens; their logprobs must match too, bit for
    bit (the verify pass is width-invariant). Sampled, the tokens differ, but each token's
    logprob is still the AR model's (checked against the recompute above)."""
    model = inference_model(4)
    kwargs = dict(eos=4, max_new_tokens=19, block_length=5, logprobs=2, temperature=temperature, seed=3)
    ar = run(model, PROMPTS, mode="ar", **kwargs)
    for mode in ["linear_spec", "quad_spec"]:
        for a, s in zip(ar, run(model, PROMPTS, mode=mode, **kwargs)):
            if temperature == 0.0:
                assert s.output_ids == a.output_ids
                assert s.logprobs == a.logprobs, mode
            assert len(s.logprobs) == len(s.output_ids)


@pytest.mark.parametrize("score_rows", [128, 2])  # 2: a prompt scored a few slots at a time
def test_prompt_logprobs_and_scoring_without_generating(monkeypatch, score_rows):
    from blockdiff.decoding import batch as batching

    monkeypatch.setattr(batching, "PROMPT_SCORE_ROWS", score_rows)
    model = tiny_model(5, vocab=24)
    prompt = [1, 5, 9, 2, 7, 7, 3]
    full = causal_logprobs(model, prompt)
    for max_new in (0, 3):
        seq = run(model, [prompt], mode="ar", max_new_tokens=max_new, prompt_logprobs=1)[0]
        assert seq.prompt_logprobs[0] is None
        for i, lp in enumerate(seq.prompt_logprobs[1:], start=1):
            assert lp.token_id == prompt[i]
            assert lp.logprob == pytest.approx(float(full[i - 1, prompt[i]]), abs=1e-4)
            assert lp.top[0][0] == int(full[i - 1].argmax())
        assert len(seq.prompt_logprobs) == len(prompt)
        assert len(seq.output_ids) == max_new and seq.finish_reason == "length"
        assert seq.logprobs == []  # logprobs of outputs were not asked for


def test_a_stop_string_cuts_the_logprobs_with_the_tokens():
    from support.models import tiny_tokenizer
    tok = tiny_tokenizer()
    model = tiny_model(6, vocab=300)
    prompt = tok.encode("the cat")
    free = run(model, [prompt], mode="ar", max_new_tokens=12)[0]
    text = tok.decode(free.output_ids)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("the model's text has no usable stop string")
    from blockdiff.decoding.sequence import Sequence
    from support.models import decode
    seq = Sequence(prompt, SamplingParams(max_new_tokens=12, stop=[stop], logprobs=0), frozenset(), tok.decode)
    decode(model, [seq])
    assert seq.finish_reason == "stop" and len(seq.output_ids) < 12
    assert [lp.token_id for lp in seq.logprobs] == seq.output_ids


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_diffusion_and_bad_counts_are_refused(field):
    with pytest.raises(InvalidParameter, match="diffusion") as e:
        SamplingParams(mode="diffusion", **{field: 1})
    assert e.value.param == field
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(InvalidParameter, match=field):
            SamplingParams(**{field: bad})
    with pytest.raises(InvalidParameter, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
