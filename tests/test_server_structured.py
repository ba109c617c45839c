"""Structured output through the official `openai` client: OpenAI's response_format and vLLM's
guided_* / structured_outputs fields give what LLM.generate gives under the same grammar
(which tests/test_structured.py checks against a masked recompute), streamed or not."""
from __future__ import annotations

import json

import pytest

from blockdiff.decoding.grammar import StructuredOutputs
from test_server import client, llm, server  # noqa: F401  (module-scoped: this module gets its own server)
from test_structured import SCHEMA

LOSSLESS = ["ar", "linear_spec", "quad_spec"]
MESSAGES = [{"role": "user", "content": "the cat"}]


def in_process(llm, prompt, spec: StructuredOutputs, chat: bool = False, **kw) -> str:
    generate = llm.chat if chat else llm.generate
    return generate(prompt, mode="ar", max_new_tokens=64, structured_outputs=spec, block_length=4,
                    use_tqdm=False, **kw)[0].text


@pytest.mark.parametrize("mode", LOSSLESS)
def test_response_format_json_schema_in_every_lossless_mode(llm, client, mode):
    expected = in_process(llm, MESSAGES, StructuredOutputs(json=SCHEMA), chat=True)
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}},
        extra_body={"mode": mode, "block_length": 4 if mode != "quad_spec" else 3})
    choice = r.choices[0]
    assert choice.message.content == expected
    if choice.finish_reason == "stop":
        assert set(json.loads(choice.message.content)) == set(SCHEMA["properties"])


@pytest.mark.parametrize("body,spec", [
    ({"guided_choice": ["hello there", "the mat"]}, StructuredOutputs(choice=["hello there", "the mat"])),
    ({"guided_regex": "[a-c]{2,5}!"}, StructuredOutputs(regex="[a-c]{2,5}!")),
    ({"guided_json": SCHEMA}, StructuredOutputs(json=SCHEMA)),
    ({"guided_grammar": 'root ::= "(" [a-c]+ ")"'}, StructuredOutputs(grammar='root ::= "(" [a-c]+ ")"')),
    ({"structured_outputs": {"regex": "x[0-9]+y"}}, StructuredOutputs(regex="x[0-9]+y")),
    ({"response_format": {"type": "json_object"}}, StructuredOutputs(json_object=True)),
])
def test_vllm_fields_on_completions(llm, client, body, spec):
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=64, temperature=0,
                                  extra_body={"mode": "linear_spec", **body})
    assert r.choices[0].text == in_process(llm, "the cat", spec)


def test_streamed_json_equals_the_whole_answer(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=64, temperature=0,
                  response_format={"type": "json_object"}, extra_body={"mode": "quad_spec", "block_length": 3})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = client.chat.completions.create(stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert whole.startswith("{")
