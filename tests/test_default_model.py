"""The embedded default model (SmolLM2-135M-Instruct): parity with transformers, lossless spec modes."""
import pytest
import torch

from blockdiff import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]


@torch.inference_mode()
def test_logits_match_transformers(default_llm, hf_model):
    ids = torch.tensor([default_llm.encode("Block diffusion decodes many tokens per forward pass, " * 4)])
    ours = default_llm.model.logits(default_llm.model(ids))
    torch.testing.assert_close(ours, hf_model(ids).logits, atol=1e-3, rtol=1e-4)


@torch.inference_mode()
def test_greedy_generation_matches_transformers(default_llm, hf_model):
    for prompt in PROMPTS:
        ids = default_llm.encode(prompt)
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        ours = default_llm.generate(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True), use_tqdm=False)[0]
        assert ours.token_ids == theirs


# L=32 in the default dtype: tests/test_width_invariance.py
@pytest.mark.parametrize("mode,block", [("linear_spec", 5), ("quad_spec", 8)])
def test_spec_modes_are_lossless_on_the_default_model(default_llm, mode, block):
    params = dict(max_new_tokens=40, temperature=0.0)
    ar = default_llm.generate(PROMPTS, SamplingParams(mode="ar", **params), use_tqdm=False)
    spec = default_llm.generate(PROMPTS, SamplingParams(mode=mode, block_length=block, **params), use_tqdm=False)
    for a, s in zip(ar, spec):
        assert s.token_ids == a.token_ids and s.text == a.text
        assert s.metrics.acceptance >= 1.0


def test_chat_answers_sensibly(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(max_new_tokens=30), use_tqdm=False)[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_diffusion_runs_with_metrics(default_llm):
    out = default_llm.generate(PROMPTS[0], SamplingParams(mode="diffusion", max_new_tokens=40), use_tqdm=False)[0]
    m = out.metrics
    assert m.generated_tokens == len(out.token_ids) and 0 < len(out.token_ids) <= 40
    assert m.nfe >= m.steps >= 1 and m.tpf == m.generated_tokens / m.nfe and m.tokens_per_s > 0


def test_stop_string_cuts_even_inside_a_block(default_llm):
    full = default_llm.generate(PROMPTS[1], SamplingParams(mode="linear_spec", max_new_tokens=30), use_tqdm=False)[0]
    stop = full.text[8:11]
    cut = default_llm.generate(PROMPTS[1], SamplingParams(mode="linear_spec", max_new_tokens=30, stop=[stop]),
                               use_tqdm=False)[0]
    assert cut.text == full.text[:full.text.index(stop)] and stop not in cut.text
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[:len(cut.token_ids)]
