"""Structured output (decoding/grammar.py): every mode's output follows the grammar, greedy
output equals a masked full recompute in ar and both spec modes, and bad grammars are refused."""
import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockdiff import LLM
from blockdiff.decoding.grammar import GrammarError, StructuredOutputs
from blockdiff.sampling import InvalidParameter, SamplingParams

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tags": {"type": "array", "items": {"enum": ["a", "bc"]}, "maxItems": 3}},
          "required": ["answer", "count", "tags"], "additionalProperties": False}
SPECS = {
    "json": StructuredOutputs(json=SCHEMA),
    "regex": StructuredOutputs(regex=r"(the|cat|sat) [a-z]{1,6}( [0-9]{2})?"),
    "choice": StructuredOutputs(choice=["hello there", "the mat", "def main"]),
    "grammar": StructuredOutputs(grammar='root ::= "(" item ("," item)* ")"\nitem ::= [a-c]+ | "x"'),
}
PROMPTS = ["the cat", "def main():", "hello"]


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(tiny_dir, dtype="float32")


def fullmatch(kind: str, text: str) -> bool:
    if kind == "json":
        value = json.loads(text)
        return value["answer"] in ("yes", "no") and 0 <= value["count"] <= 99 and set(value) == set(SCHEMA["properties"])
    if kind == "regex":
        return re.fullmatch(SPECS["regex"].regex, text) is not None
    if kind == "choice":
        return text in SPECS["choice"].choice
    return re.fullmatch(r"\((?:[a-c]+|x)(?:,(?:[a-c]+|x))*\)", text) is not None


def masked_recompute(llm, prompt: str, spec: StructuredOutputs, max_new_tokens: int) -> list[int]:
    """Greedy decoding under the grammar with a full causal forward per token, no cache."""
    ids = llm.tokenizer.encode(prompt, add_special_tokens=True)
    grammar, out = llm.grammars.grammar(spec), []
    eos = set(llm.tokenizer.eos_token_ids)
    while len(out) < max_new_tokens:
        with torch.inference_mode():
            hidden = llm.model(torch.tensor([ids + out]), None, None, "causal")  # (1, T, hidden)
            logits = llm.model.logits(hidden[0, -1]).float()  # (V,)
        token = int(logits.masked_fill(~grammar.allowed(), float("-inf")).argmax())
        out.append(token)
        grammar.consume(token)
        if token in eos or grammar.complete:
            break
    return out


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_greedy_output_equals_a_masked_recompute_in_every_lossless_mode(llm, kind):
    spec = SPECS[kind]
    expected = [masked_recompute(llm, p, spec, 64) for p in PROMPTS]
    for mode, block_length in [("ar", None), ("linear_spec", 4), ("quad_spec", 3)]:
        outs = llm.generate(PROMPTS, mode=mode, block_length=block_length, max_new_tokens=64,
                            structured_outputs=spec, use_tqdm=False)
        assert [o.token_ids for o in outs] == expected, mode
        for o in outs:
            if o.finish_reason == "stop":
                assert fullmatch(kind, o.text), (mode, o.text)
    assert any(o.finish_reason == "stop" for o in outs)


@pytest.mark.parametrize("mode", ["ar", "linear_spec", "quad_spec"])
def test_sampled_output_follows_the_grammar(llm, mode):
    """Sampling: the speculative rejection rule runs on masked target distributions, so a
    forbidden draft is always rejected and every emitted token is allowed."""
    for kind in ("regex", "choice", "grammar"):
        outs = llm.generate(PROMPTS * 2, mode=mode, block_length=4 if mode != "quad_spec" else 3,
                            temperature=1.0, seed=7, max_new_tokens=40, structured_outputs=SPECS[kind],
                            use_tqdm=False)
        for o in outs:
            assert o.finish_reason == "stop" and fullmatch(kind, o.text), (kind, o.text, o.finish_reason)


def test_default_model_writes_json_for_a_schema(default_llm):
    spec = StructuredOutputs(json={"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                                     "age": {"type": "integer"}},
                                   "required": ["name", "age"], "additionalProperties": False})
    messages = [{"role": "user", "content": "Give me a person named Alice who is 30 years old, as JSON."}]
    outs = {mode: default_llm.chat(messages, mode=mode, max_new_tokens=40, structured_outputs=spec, use_tqdm=False)[0]
            for mode in ("ar", "linear_spec", "quad_spec")}
    assert json.loads(outs["ar"].text) == {"name": "Alice", "age": 30}
    assert outs["ar"].finish_reason == "stop"
    assert outs["linear_spec"].token_ids == outs["ar"].token_ids == outs["quad_spec"].token_ids


def test_logprobs_stay_the_raw_models(llm):
    """The grammar picks the token; its logprob is the unconstrained model's (vLLM's default)."""
    plain = llm.generate(["the cat"], max_new_tokens=8, logprobs=2, use_tqdm=False)[0]
    constrained = llm.generate(["the cat"], max_new_tokens=8, logprobs=2, structured_outputs=SPECS["regex"],
                               use_tqdm=False)[0]
    assert constrained.logprobs[0].top == plain.logprobs[0].top  # the same first distribution
    for lp in constrained.logprobs:
        assert lp.logprob <= lp.top[0][1] + 1e-6


@pytest.mark.parametrize("fields,field", [
    ({}, "json"),
    ({"regex": "a", "choice": ["a"]}, "choice"),
    ({"regex": "(a|b"}, "regex"),
    ({"regex": 5}, "regex"),
    ({"json": {"type": "nonsense"}}, "json"),
    ({"json": "{not json"}, "json"),
    ({"json": [1, 2]}, "json"),
    ({"choice": []}, "choice"),
    ({"choice": ["a", ""]}, "choice"),
    ({"grammar": "start: (("}, "grammar"),
    ({"grammar": "root ::= (("}, "grammar"),
    ({"grammar": "   "}, "grammar"),
])
def test_bad_structured_outputs_name_the_field(fields, field):
    with pytest.raises(GrammarError) as e:
        StructuredOutputs(**fields)
    assert e.value.field == field and str(e.value)


def test_diffusion_refuses_structured_output():
    with pytest.raises(InvalidParameter) as e:
        SamplingParams(mode="diffusion", structured_outputs=SPECS["regex"])
    assert e.value.param == "structured_outputs"


@settings(max_examples=40, deadline=None)
@given(path=st.lists(st.integers(0, 299), max_size=6), prefix=st.sampled_from(["", '{"answer": "', '{"answer": "no", "count": 1']))
def test_path_masks_equal_the_masks_of_each_prefix(llm, path, prefix):
    """Row i of path_masks is the mask after the first i drafts, up to the first forbidden one
    (or the grammar's end), and the matcher is left where it was."""
    grammar = llm.grammars.grammar(SPECS["json"])
    for token in llm.tokenizer.encode(prefix):
        grammar.consume(token)
    before = grammar.allowed()
    masks = grammar.path_masks(path)
    assert torch.equal(grammar.allowed(), before)
    fresh = llm.grammars.grammar(SPECS["json"])
    for token in llm.tokenizer.encode(prefix):
        fresh.consume(token)
    expected = [fresh.allowed()]
    for token in path:
        if fresh.complete or not expected[-1][token]:
            break
        fresh.consume(token)
        expected.append(fresh.allowed())
    assert masks.shape == (len(path) + 1, llm.config.vocab_size)
    for i in range(len(path) + 1):
        assert torch.equal(masks[i], expected[min(i, len(expected) - 1)])

