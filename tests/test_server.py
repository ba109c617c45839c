"""The OpenAI-compatible server, driven by the official `openai` client over loopback:
completions, chat, streaming, per-request modes, batching parity, stop strings, infilling."""
from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest
import torch

from blockdiff.decoding.sequence import Sequence
from blockdiff.sampling import SamplingParams
from support.models import attach_random_draft_adapter, decode, tiny_model
from support.server import one_thread_llm, serving

MODES = ["ar", "diffusion", "linear_spec", "quad_spec"]
PROMPTS = ["the cat sat", "hello there", "def main():", "the mat on"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    with one_thread_llm(tmp_path_factory.mktemp("srv")) as llm:
        yield llm


@pytest.fixture(scope="module")
def server(llm):
    with serving(llm, block_length=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(llm, prompt, **kw) -> list[int]:
    kw.setdefault("block_length", 4)
    return llm.generate(prompt, SamplingParams(temperature=0.0, **kw), use_tqdm=False)[0].token_ids


def test_health_models_and_server_info(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["tiny"]
    info = httpx.get(server.url + "/get_server_info").json()
    assert "avg_spec_accept_length" in info["internal_states"][0]
    assert info["default_mode"] == "auto"
    assert info["dtype"] == "float32"  # the resolved dtype the model runs in, never "auto"
    assert info["auto_mode"]["candidates"] == ["ar", "linear_spec", "quad_spec"]


@pytest.mark.parametrize("mode", MODES)
def test_completion_in_each_mode_equals_llm_generate(llm, client, mode):
    r = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=13, temperature=0,
                                  extra_body={"mode": mode, "return_token_ids": True})
    choice = r.choices[0].model_dump()
    assert choice["token_ids"] == reference(llm, "the cat sat", mode=mode, max_new_tokens=13)
    assert r.choices[0].text == llm.tokenizer.decode(choice["token_ids"]) or r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(choice["token_ids"])
    metrics = r.model_dump()["metrics"]
    assert metrics["mode"] == mode and metrics["nfe"] >= 1 and metrics["tpf"] > 0 and metrics["ttft_s"] > 0
    assert (metrics["acceptance"] is not None) == mode.endswith("spec")


def test_auto_mode_is_lossless_and_reports_what_it_measured(server, llm, client):
    """The server's default mode: each request gets a measured-fastest lossless mode."""
    modes = set()
    for prompt in PROMPTS * 3:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body={"return_token_ids": True})  # no mode: the default, auto
        assert r.model_dump()["choices"][0]["token_ids"] == reference(llm, prompt, max_new_tokens=10)
        modes.add(r.model_dump()["metrics"]["mode"])
    assert modes <= {"ar", "linear_spec", "quad_spec"} and "ar" in modes
    measured = httpx.get(server.url + "/get_server_info").json()["auto_mode"]["measured"]
    assert measured["<=1"]["ar"]["steps"] > 0 and measured["<=1"]["ar"]["tokens_per_s"] > 0


def test_chat_applies_the_template(llm, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0,
                                       extra_body={"mode": "linear_spec", "return_token_ids": True})
    expected = llm.chat(messages, SamplingParams(mode="linear_spec", max_new_tokens=9, block_length=4),
                        use_tqdm=False)[0]
    assert r.model_dump()["choices"][0]["token_ids"] == expected.token_ids
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "quad_spec"])
def test_stream_carries_the_same_text_and_usage(client, mode):
    kw = dict(model="tiny", max_tokens=17, temperature=0, extra_body={"mode": mode, "ignore_eos": True})
    whole = client.completions.create(prompt="hello there", **kw)
    chunks = list(client.completions.create(prompt="hello there", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 17 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat = list(client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], stream=True, **kw))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason == "length"


def test_concurrent_mixed_modes_equal_one_at_a_time(llm, server):
    """Continuous batching: rows join and leave running batches; tokens must not change."""
    jobs = [dict(prompt=p, mode=m, max_tokens=9 + 3 * i, ignore_eos=i % 2 == 0)
            for i, (p, m) in enumerate([(p, m) for p in PROMPTS for m in MODES])]

    def call(job):
        body = {"prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0, "mode": job["mode"],
                "ignore_eos": job["ignore_eos"], "return_token_ids": True, "model": "tiny"}
        return httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, jobs))
    for job, answer in zip(jobs, answers):
        expected = reference(llm, job["prompt"], mode=job["mode"], max_new_tokens=job["max_tokens"],
                             ignore_eos=job["ignore_eos"])
        assert answer["choices"][0]["token_ids"] == expected, job


@pytest.mark.parametrize("mode", ["diffusion", "linear_spec"])
def test_no_text_past_a_stop_string_is_ever_streamed(client, mode):
    """Blocks of 8 overshoot the stop string; neither the body nor the stream may show past it."""
    for prompt in PROMPTS:
        kw = dict(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                  extra_body={"mode": mode, "ignore_eos": True, "block_length": 8})
        free = client.completions.create(**kw).choices[0].text
        # a 3-character stop string first seen well inside the text (the random model's text is odd)
        starts = [i for i in range(6, len(free) - 3) if "\ufffd" not in free[i:i + 3] and free.index(free[i:i + 3]) >= 6]
        if starts:
            break
    else:
        pytest.skip("the random model produced no text to stop on")
    stop = free[starts[0]:starts[0] + 3]
    expected = free[:free.index(stop)]
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[stop], stream=True, **kw))
    assert streamed == expected


def test_stop_token_ids_min_tokens_and_seed(llm, client):
    kw = dict(model="tiny", prompt="def main():", max_tokens=20)
    free = client.completions.create(temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True}, **kw)
    ids = free.model_dump()["choices"][0]["token_ids"]
    stop_id = ids[4]
    cut = client.completions.create(temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True,
                                                               "stop_token_ids": [stop_id]}, **kw)
    assert cut.model_dump()["choices"][0]["token_ids"] == ids[:ids.index(stop_id) + 1]
    assert cut.choices[0].finish_reason == "stop"
    late = client.completions.create(temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True,
                                                                "stop_token_ids": [stop_id], "min_tokens": 20}, **kw)
    assert late.model_dump()["choices"][0]["token_ids"] == ids
    a, b = (client.completions.create(temperature=1.0, seed=5, extra_body={"top_k": 20, "min_p": 0.01}, **kw)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def reference_infill(model, prefix, suffix, n, block, threshold, mask):
    """Fill-in-the-middle without a cache: one full forward per pass over prefix|middle|suffix,
    a draft adapter (if any) on for the middle and the suffix."""
    tokens = prefix + [mask] * n + suffix
    P, T = len(prefix), len(tokens)
    pattern = torch.ones(T, T, dtype=torch.bool)
    pattern[:P] = torch.ones(P, T, dtype=torch.bool).tril()  # the prefix is causal
    drafting = torch.arange(T)[None, :] >= P  # (1, T)
    open_ = [True] * n
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        while any(open_[lo:hi]):
            hidden = model(torch.tensor([tokens]), pattern=pattern, adapter_gate=drafting)  # (1, T, hidden)
            probs = torch.softmax(model.logits(hidden)[0], -1)  # (T, V)
            slots = [i for i in range(lo, hi) if open_[i]]
            conf, pick = probs[[P + i for i in slots]].max(-1)
            commit = conf >= threshold
            commit[conf.argmax()] = True
            for i, c, t in zip(slots, commit.tolist(), pick.tolist()):
                if c:
                    tokens[P + i], open_[i] = t, False
    return tokens[P:P + n]


def test_infill_with_suffix_matches_a_cacheless_reference(llm, server):
    def infill(prefix, suffix):
        body = {"prompt": prefix, "suffix": suffix, "max_tokens": 10, "temperature": 0, "block_length": 4,
                "threshold": 0.6, "ignore_eos": True, "return_token_ids": True}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        assert r["metrics"]["mode"] == "infill"
        return r["choices"][0]["token_ids"]

    tok = llm.tokenizer
    got = infill("def main():", " return 0")
    with torch.inference_mode():
        want = reference_infill(llm.model, tok.encode("def main():", add_special_tokens=True),
                                tok.encode(" return 0"), 10, 4, 0.6, llm.config.mask_token_id)
    assert got == want
    assert any(infill(p, " the mat") != infill(p, "hello there") for p in PROMPTS)  # the suffix is read
    bad = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "suffix": "b", "mode": "ar"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "suffix"


def test_infill_runs_the_draft_adapter_like_diffusion():
    model = attach_random_draft_adapter(tiny_model(6, vocab=24))
    prefix, suffix, mask = [1, 2, 3], [4, 5], model.config.mask_token_id
    seq = Sequence(prefix, SamplingParams(mode="diffusion", max_new_tokens=6, block_length=3, threshold=0.6),
                   suffix_ids=suffix)
    decode(model, [seq])
    with torch.inference_mode():
        want = reference_infill(model, prefix, suffix, 6, 3, 0.6, mask)
        base = reference_infill(tiny_model(6, vocab=24), prefix, suffix, 6, 3, 0.6, mask)  # no adapter
    assert seq.output_ids == want
    assert want != base  # the adapter changes the answer, so the check above has teeth


def test_client_disconnect_frees_the_slot(server):
    body = {"prompt": "the cat", "max_tokens": 480, "ignore_eos": True, "stream": True, "mode": "ar",
            "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = httpx.get(server.url + "/get_server_info").json()["internal_states"][0]
        if state["num_running_reqs"] == 0:
            break
        time.sleep(0.05)
    assert state["num_running_reqs"] == 0
    metrics = httpx.get(server.url + "/metrics").text
    assert 'blockdiff:request_success_total{finished_reason="abort",model_name="tiny"}' in metrics


def test_prometheus_metrics_use_vllm_names(server, client):
    client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0,
                              extra_body={"mode": "linear_spec"})
    text = httpx.get(server.url + "/metrics").text
    for name in ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "num_requests_running", "num_requests_waiting",
                 "prompt_tokens_total", "generation_tokens_total", "spec_decode_num_drafts_total",
                 "spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total", "nfe_total",
                 "tokens_per_forward"]:
        assert f"blockdiff:{name}" in text, name
    info = httpx.get(server.url + "/get_server_info").json()
    assert info["internal_states"][0]["avg_spec_accept_length"] >= 1.0


def test_tokenizer_endpoints_as_vllm_serves_them(llm, server):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "the cat sat", "add_special_tokens": False}).json()
    assert r["tokens"] == llm.tokenizer.encode("the cat sat") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == llm.max_context
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "the cat sat"}
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == llm.tokenizer.eos_tokens[0] and info["chat_template"] == llm.tokenizer.chat_template
    for path, body in [("/tokenize", {}), ("/tokenize", {"prompt": "a", "messages": []}),
                       ("/tokenize", {"messages": [{"role": "user", "content": None}]}),
                       ("/detokenize", {"tokens": [10**7]}), ("/detokenize", {"tokens": "abc"})]:
        assert httpx.post(server.url + path, json=body).status_code == 400
