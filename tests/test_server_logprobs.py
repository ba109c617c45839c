"""`logprobs`, `echo` and chat `top_logprobs` as vLLM serves them, through the official
`openai` client: the numbers are the engine's (checked against a full recompute in
tests/test_logprobs.py), the same in every lossless mode, streamed or not."""
from __future__ import annotations

import httpx
import pytest

from blockdiff.sampling import SamplingParams
from support.models import causal_logprobs
from test_server import client, llm, server  # noqa: F401  (module-scoped: this module gets its own server)

LOSSLESS = ["ar", "linear_spec", "quad_spec"]


def engine_logprobs(llm, prompt, **kw):
    params = SamplingParams(temperature=0.0, block_length=4, **kw)
    return llm.generate(prompt, params, use_tqdm=False)[0]


def prompt_scores(llm, ids: list[int]) -> list[float]:
    """The log-probability of each prompt token after the first, from one causal forward."""
    logprobs = causal_logprobs(llm.model, ids)  # (T, V)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.mark.parametrize("mode", LOSSLESS)
def test_completion_logprobs_are_the_engines_in_every_mode(llm, client, mode):
    r = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=12, temperature=0, logprobs=3,
                                  extra_body={"mode": mode, "return_token_ids": True})
    choice = r.choices[0]
    lp = choice.logprobs
    ref = engine_logprobs(llm, "the cat sat", mode="ar", max_new_tokens=12, logprobs=3)
    assert choice.model_dump()["token_ids"] == ref.token_ids
    assert lp.token_logprobs == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-6)
    assert lp.tokens == [llm.tokenizer.decode([t], skip_special_tokens=False) for t in ref.token_ids]
    assert lp.text_offset == [len(llm.tokenizer.decode(ref.token_ids[:i])) for i in range(len(ref.token_ids))]
    for token, value, top, record in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, ref.logprobs):
        # the top 3 and the chosen token, keyed by text (byte tokens that decode alike share a key)
        assert len(top) <= 4 and token in top and ("\ufffd" in token or top[token] == value)
        assert max(top.values()) == pytest.approx(record.top[0][1])


def test_echo_with_no_new_tokens_scores_the_prompt_as_lm_eval_asks(llm, client):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, max_tokens 0 or 1."""
    ids = llm.tokenizer.encode("the cat sat on the mat")
    expected = prompt_scores(llm, ids)
    for max_tokens in (0, 1):
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, echo=True, logprobs=1,
                                      temperature=0)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
        assert r.choices[0].text.startswith(llm.tokenizer.decode(ids))
        assert r.usage.completion_tokens == max_tokens
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=0, echo=True)  # no logprobs asked
    assert r.choices[0].text == "the cat" and r.choices[0].logprobs is None


def test_echo_text_offsets_run_through_prompt_and_output(llm, client):
    r = client.completions.create(model="tiny", prompt="hello there", max_tokens=5, echo=True, logprobs=0,
                                  temperature=0)
    choice = r.choices[0]
    assert choice.text.startswith("hello there")
    offsets = choice.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert all(choice.text[o:].startswith(t) for o, t in zip(offsets, choice.logprobs.tokens) if t.isprintable())


@pytest.mark.parametrize("mode", LOSSLESS)
def test_chat_logprobs_with_top_logprobs(llm, client, mode):
    messages = [{"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"mode": mode})
    content = r.choices[0].logprobs.content
    ref = llm.chat(messages, SamplingParams(max_new_tokens=8, block_length=4, logprobs=2), use_tqdm=False)[0]
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-6)
    # a token may hold part of a character: its text reads U+FFFD, its bytes are exact
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace") == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("stop", [None, ["the"]])
def test_a_stream_carries_each_tokens_logprob_once(client, kind, stop):
    common = dict(model="tiny", max_tokens=16, temperature=0, stop=stop)
    if kind == "completion":
        whole = client.completions.create(prompt="the cat sat", logprobs=2, **common).choices[0]
        chunks = list(client.completions.create(prompt="the cat sat", logprobs=2, stream=True, **common))
        streamed = [v for c in chunks for ch in c.choices if ch.logprobs for v in ch.logprobs.token_logprobs]
        assert streamed == whole.logprobs.token_logprobs
        offsets = [v for c in chunks for ch in c.choices if ch.logprobs for v in ch.logprobs.text_offset]
        assert offsets == whole.logprobs.text_offset
    else:
        messages = [{"role": "user", "content": "the cat sat"}]
        whole = client.chat.completions.create(messages=messages, logprobs=True, **common).choices[0]
        chunks = list(client.chat.completions.create(messages=messages, logprobs=True, stream=True, **common))
        streamed = [e.logprob for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
        assert streamed == [e.logprob for e in whole.logprobs.content]


def test_streamed_echo_sends_the_prompt_first(llm, client):
    chunks = list(client.completions.create(model="tiny", prompt="hello there", max_tokens=4, echo=True,
                                            logprobs=1, temperature=0, stream=True))
    first = chunks[0].choices[0]
    assert first.text == "hello there" and first.logprobs.token_logprobs[0] is None
    assert len(first.logprobs.tokens) == len(llm.tokenizer.encode("hello there"))


@pytest.mark.parametrize("body,param", [
    ({"prompt": "the cat", "logprobs": 1, "mode": "diffusion"}, "logprobs"),
    ({"prompt": "the cat", "logprobs": 21}, "logprobs"),
    ({"prompt": "the cat", "echo": True, "logprobs": 1, "suffix": " mat"}, "logprobs"),
    ({"prompt": "the cat", "max_tokens": 0}, "max_tokens"),
])
def test_what_cannot_be_scored_is_refused(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("body,param", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"logprobs": True, "mode": "diffusion"}, "logprobs"),
])
def test_chat_logprobs_errors(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
