"""Bad input gets an OpenAI-shaped 4xx naming the parameter, and the server keeps serving:
the issue's list one by one, a fuzz test of the request schema, auth, overload, shutdown."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockdiff.server.app import build_app
from blockdiff.server.config import ServerConfig
from support.server import ServerThread, one_thread_llm, serving

BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    with one_thread_llm(tmp_path_factory.mktemp("err")) as llm:
        yield llm


@pytest.fixture(scope="module")
def server(llm):
    with serving(llm, block_length=4, max_body_bytes=BODY_LIMIT) as srv:
        yield srv


def assert_error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error


OK = {"prompt": "the cat", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
BAD = [  # (path, body, status, param)
    ("/v1/completions", {**OK, "max_tokens": "four"}, 400, "max_tokens"),
    ("/v1/completions", {**OK, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {**OK, "stop": 3}, 400, "stop"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {**OK, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**OK, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**OK, "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": 100_000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}, 400, "max_tokens"),
    ("/v1/completions", {**OK, "prompt": "the cat sat on the mat " * 200}, 400, "prompt"),
    ("/v1/completions", {**OK, "prompt": list(range(5)) * 120}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "cat " * 600}]}, 400, "messages"),
    ("/v1/completions", {**OK, "mode": "turbo"}, 400, "mode"),
    ("/v1/completions", {**OK, "block_length": 0}, 400, "block_length"),
    ("/v1/completions", {**OK, "block_length": 4096}, 400, "block_length"),
    ("/v1/completions", {**OK, "mode": "quad_spec", "block_length": 100}, 400, "block_length"),
    ("/v1/completions", {**OK, "threshold": 1.5}, 400, "threshold"),
    ("/v1/completions", {**OK, "threshold": -0.1}, 400, "threshold"),
    ("/v1/completions", {**OK, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {**OK, "n": 2}, 400, "n"),
    ("/v1/completions", {**OK, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**OK, "min_tokens": -1}, 400, "min_tokens"),
    ("/v1/completions", {**OK, "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("/v1/completions", {**OK, "logprobs": 2, "mode": "diffusion"}, 400, "logprobs"),
    # structured output that cannot be honoured, fields that change the output contract, bad chat turns
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {}}}, 400,
     "response_format"),
    ("/v1/completions", {**OK, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/v1/completions", {**OK, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
     400, "response_format"),
    ("/v1/completions", {**OK, "guided_regex": "[0-9"}, 400, "guided_regex"),
    ("/v1/completions", {**OK, "guided_choice": []}, 400, "guided_choice"),
    ("/v1/completions", {**OK, "guided_json": "{not json"}, 400, "guided_json"),
    ("/v1/completions", {**OK, "guided_grammar": "root ::= (("}, 400, "guided_grammar"),
    ("/v1/completions", {**OK, "guided_regex": "a", "guided_choice": ["a"]}, 400, "guided_choice"),
    ("/v1/completions", {**OK, "guided_regex": "a", "response_format": {"type": "json_object"}}, 400, "guided_regex"),
    ("/v1/completions", {**OK, "structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, 400,
     "structured_outputs"),
    ("/v1/completions", {**OK, "structured_outputs": "a+"}, 400, "structured_outputs"),
    ("/v1/completions", {**OK, "guided_regex": "a+", "mode": "diffusion"}, 400, "structured_outputs"),
    ("/v1/completions", {**OK, "guided_regex": "a+", "suffix": " mat"}, 400, "structured_outputs"),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": "required"}, 400, "tools"),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL]}, 400, "tools"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400,
     "tool_choice"),
    ("/v1/completions", {**OK, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("/v1/completions", {**OK, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ("/v1/completions", {**OK, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {**OK, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{b[2]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_clear_error(server, path, body, status, param):
    assert_error(httpx.post(server.url + path, json=body, timeout=30), status, param)
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {**OK, "prompt": "the cat sat on the mat " * 200}, "prompt"),
    ("/v1/completions", {**OK, "max_tokens": 100_000}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "cat " * 600}]}, "messages"),
    ("/v1/completions", {**OK, "prompt": "the cat", "suffix": " sat on the mat" * 200, "mode": "diffusion"}, "prompt"),
])
def test_what_does_not_fit_the_context_says_so(server, path, body, param):
    """LLM.make_sequence checks every prompt (a fill-in-the-middle suffix counted) for both front
    ends; the server names the request's own field and OpenAI's code."""
    error = assert_error(httpx.post(server.url + path, json=body, timeout=30), 400, param)
    assert error["code"] == "context_length_exceeded" and "context" in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b"", b'{"prompt": "\\ud800", "max_tokens": 2}',
                                 b'{"prompt": "a", "stop": ["\\udfff"]}', b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                 b'{"prompt": "a", "user": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}"])
def test_body_that_is_not_a_json_object(server, raw):
    r = httpx.post(server.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {**OK, "response_format": {"type": "text"}, "logit_bias": {}}),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": "none"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                                           {"role": "user", "content": "again"}], "max_tokens": 2}),
])
def test_fields_that_leave_the_answer_unchanged_are_accepted(server, path, body):
    assert httpx.post(server.url + path, json=body, timeout=30).status_code == 200


def test_huge_body_gets_413(server):
    body = json.dumps({"prompt": "x" * (BODY_LIMIT + 10)})
    assert_error(httpx.post(server.url + "/v1/completions", content=body), 413)

    def chunks():  # no Content-Length: the limit must hold while streaming the body in
        for _ in range(BODY_LIMIT // 1000 + 2):
            yield b" " * 1000
    assert_error(httpx.post(server.url + "/v1/completions", content=chunks()), 413)


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + "/v1/completions"), 405)


def test_the_openai_client_sees_the_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", extra_body={"mode": "warp"})
    assert e.value.body["param"] == "mode"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hi")


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False) |
                       st.text(max_size=20), lambda inner: st.lists(inner, max_size=3), max_leaves=6)
FIELDS = {
    "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-2, 400), max_size=6), JSONISH),
    "messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "wizard", ""]),
                                                          "content": st.one_of(st.text(max_size=20), st.none(), JSONISH)}),
                                   max_size=2), JSONISH),
    "max_tokens": st.one_of(st.integers(-3, 12), JSONISH),
    "temperature": st.one_of(st.floats(-1, 3, allow_subnormal=False), JSONISH), "top_p": st.one_of(st.floats(-1, 2, allow_subnormal=False), JSONISH),
    "top_k": st.one_of(st.integers(-2, 50), JSONISH), "min_p": st.one_of(st.floats(-1, 2, allow_subnormal=False), JSONISH),
    "mode": st.one_of(st.sampled_from(["ar", "diffusion", "linear_spec", "quad_spec", "x"]), JSONISH),
    "block_length": st.one_of(st.integers(-1, 40), JSONISH), "threshold": st.one_of(st.floats(-1, 2, allow_subnormal=False), JSONISH),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2), JSONISH),
    "stop_token_ids": st.one_of(st.lists(st.integers(-1, 400), max_size=2), JSONISH),
    "n": st.one_of(st.integers(0, 3), JSONISH), "seed": JSONISH, "ignore_eos": JSONISH,
    "min_tokens": st.one_of(st.integers(-1, 5), JSONISH), "stream": st.booleans(), "suffix": JSONISH,
    "model": st.sampled_from(["tiny", "other"]), "stream_options": JSONISH,
    "response_format": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "x"])}),
                                 st.fixed_dictionaries({"type": st.just("json_schema"),
                                                        "json_schema": st.fixed_dictionaries({"schema": JSONISH})}),
                                 JSONISH),
    "guided_regex": st.one_of(st.text(max_size=8), JSONISH), "guided_choice": st.one_of(st.lists(st.text(max_size=4)), JSONISH),
    "guided_json": JSONISH, "guided_grammar": st.one_of(st.text(max_size=12), JSONISH),
    "structured_outputs": st.one_of(st.dictionaries(st.sampled_from(["json", "regex", "choice", "grammar", "x"]),
                                                    JSONISH, max_size=2), JSONISH),
    "logit_bias": st.one_of(st.dictionaries(st.text(max_size=4), st.integers(-100, 100), max_size=2), JSONISH),
    "tools": JSONISH, "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required"]), JSONISH),
    "logprobs": st.one_of(st.integers(-1, 22), st.booleans(), JSONISH), "echo": JSONISH,
    "top_logprobs": st.one_of(st.integers(-1, 22), JSONISH),
}


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.dictionaries(st.sampled_from(sorted(FIELDS)), JSONISH, max_size=4).flatmap(
           lambda d: st.fixed_dictionaries({k: FIELDS[k] for k in d})))
def test_fuzzed_requests_never_crash_the_server(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code in (200, 400, 404), r.text
    assert httpx.get(server.url + "/health").status_code == 200
    if r.status_code != 200:
        assert_error(r, r.status_code)
    elif body.get("stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"]


def test_api_key_is_required_when_set(llm):
    with serving(llm, api_key="sekrit") as srv:
        url = srv.url + "/v1/completions"
        assert_error(httpx.post(url, json=OK), 401)
        assert_error(httpx.post(url, json=OK, headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.post(url, json=OK, headers={"Authorization": "Bearer sekrit"}).status_code == 200
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="bad", max_retries=0).models.list()
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
        assert_error(httpx.post(srv.url + "/tokenize", json={"prompt": "hi"}), 401)  # the tokenizer does
        assert_error(httpx.get(srv.url + "/tokenizer_info"), 401)


def test_full_queue_gets_429_and_a_stopped_engine_503(llm):
    config = ServerConfig(model=llm.model_path, max_running_requests=1, max_queue=1, block_length=4)
    app = build_app(llm, config)
    engine = app.state.engine
    step = engine.scheduler.step

    def slow_step():  # slow enough to fill the queue on purpose
        time.sleep(0.01)
        return step()
    engine.scheduler.step = slow_step
    srv = ServerThread(app).start()
    long = {"prompt": "the cat", "max_tokens": 300, "ignore_eos": True, "stream": True, "mode": "ar"}
    streams, stop = [], threading.Event()

    def hold():  # a streaming client that keeps its request alive until told to go
        with httpx.stream("POST", srv.url + "/v1/completions", json=long, timeout=30) as r:
            streams.append(r.status_code)
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    def wait_for(cond):
        deadline = time.monotonic() + 10
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cond()

    try:
        threads = [threading.Thread(target=hold, daemon=True)]
        threads[0].start()
        wait_for(lambda: engine.num_running == 1)
        threads.append(threading.Thread(target=hold, daemon=True))
        threads[1].start()
        wait_for(lambda: engine.num_waiting == 1)
        error = assert_error(httpx.post(srv.url + "/v1/completions", json=OK), 429)
        assert error["code"] == "rate_limit_exceeded"
        stop.set()
        for t in threads:
            t.join(20)
        assert streams == [200, 200]
        wait_for(lambda: engine.num_running == 0 and engine.num_waiting == 0)
        assert httpx.post(srv.url + "/v1/completions", json=OK).status_code == 200
        engine.stop()
        assert_error(httpx.get(srv.url + "/health"), 503)
        assert_error(httpx.post(srv.url + "/v1/completions", json=OK), 503)
    finally:
        stop.set()
        srv.stop()
