"""The step-events streaming extension (`return_steps`): step chunks appear only when asked,
carry per-request events (even when requests share a batch), and add nothing else."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json

import httpx
import openai
import pytest

from blockdiff.sampling import SamplingParams
from blockdiff.server.steps import Step, StepBacklog, StepFormatter
from support.server import one_thread_llm, serving

KINDS = {"ar": {"commit"}, "diffusion": {"denoise", "commit"}, "linear_spec": {"draft", "verify", "commit"},
         "quad_spec": {"draft", "verify", "commit"}}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    with one_thread_llm(tmp_path_factory.mktemp("steps")) as llm:
        yield llm


@pytest.fixture(scope="module")
def server(llm):
    with serving(llm, block_length=4) as srv:
        yield srv


def sse_chunks(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def strip_ids(chunk: dict) -> dict:
    return {k: v for k, v in chunk.items() if k not in ("id", "created", "metrics")}


@pytest.mark.parametrize("mode", list(KINDS))
def test_steps_come_only_when_asked_and_add_nothing_else(server, mode):
    body = {"prompt": "the cat sat", "max_tokens": 11, "temperature": 0, "mode": mode, "ignore_eos": True,
            "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    plain = sse_chunks(server.url + "/v1/completions", body)
    steps = sse_chunks(server.url + "/v1/completions", {**body, "return_steps": True})
    assert not any("blockdiff_step" in c for c in plain)
    step_objects = [c["blockdiff_step"] for c in steps if "blockdiff_step" in c]
    assert {s["kind"] for s in step_objects} == KINDS[mode]
    # removing the step chunks leaves exactly the plain stream (ids and timings aside)
    rest = [strip_ids(c) for c in steps if "blockdiff_step" not in c]
    assert rest == [strip_ids(c) for c in plain]
    assert all(c["choices"] == [] and c["object"] == "text_completion" for c in steps if "blockdiff_step" in c)
    # the commits are the request's tokens, in order; NFE only grows
    final_ids = next(c for c in plain if c["choices"] and c["choices"][0]["finish_reason"])["choices"][0]["token_ids"]
    assert [t for s in step_objects if s["kind"] == "commit" for t in s["token_ids"]] == final_ids
    nfes = [s["nfe"] for s in step_objects]
    assert nfes == sorted(nfes) and nfes[-1] >= 1
    for s in step_objects:
        assert len(s["texts"]) == len(s["token_ids"]) and s["mode"] == mode and s["index"] == 0
        if s["kind"] == "denoise":
            assert all((t is None) == (x is None) for t, x in zip(s["token_ids"], s["texts"]))
        if s["kind"] == "verify":
            assert 0 <= s["accepted"] <= s["drafted"] == len(s["token_ids"]) == 3
    if mode == "diffusion":
        assert any(None in s["token_ids"] for s in step_objects if s["kind"] == "denoise")


def test_return_steps_needs_stream_and_no_suffix(server):
    for body in ({"prompt": "hi", "return_steps": True},
                 {"prompt": "hi", "return_steps": True, "stream": False},
                 {"prompt": "hi", "suffix": " there", "return_steps": True, "stream": True}):
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "return_steps", body
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "return_steps": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_steps"


@pytest.mark.parametrize("mode", ["diffusion", "quad_spec"])
def test_the_text_of_a_steps_stream_equals_the_plain_answer(server, mode):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "hello there"}]
    kw = dict(model="tiny", messages=messages, max_tokens=15, temperature=0, extra_body={"mode": mode})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    kw["extra_body"] = {"mode": mode, "return_steps": True}
    chunks = list(client.chat.completions.create(stream=True, **kw))  # the official client parses them
    steps = [c.model_extra["blockdiff_step"] for c in chunks if not c.choices]
    assert steps and all(s["kind"] in KINDS[mode] for s in steps)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_events_reach_only_their_request_when_batches_are_shared(llm, server):
    """Concurrent requests share DecodeBatches (rows merge and retire); each steps stream must
    carry exactly its own commits, and streams without the flag none."""
    jobs = [(p, m, n, i % 2 == 0) for i, (p, m, n) in enumerate(
        [(p, m, 6 + 3 * k) for k, p in enumerate(["the cat sat", "hello there", "def main():"])
         for m in ["diffusion", "linear_spec", "quad_spec"]])]

    def call(job):
        prompt, mode, n, steps = job
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "mode": mode, "ignore_eos": True,
                "stream": True, "return_steps": steps, "return_token_ids": True}
        return sse_chunks(server.url + "/v1/completions", body)

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(call, jobs))
    for (prompt, mode, n, steps), chunks in zip(jobs, answers):
        expected = llm.generate(prompt, SamplingParams(mode=mode, max_new_tokens=n, block_length=4,
                                                       ignore_eos=True), use_tqdm=False)[0].token_ids
        final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
        assert final["choices"][0]["token_ids"] == expected
        commits = [t for c in chunks if "blockdiff_step" in c and c["blockdiff_step"]["kind"] == "commit"
                   for t in c["blockdiff_step"]["token_ids"]]
        assert commits == (expected if steps else []), (prompt, mode)


def test_a_slow_reader_loses_step_events_never_text():
    """Past the backlog limit step events are dropped (and counted); text updates still queue."""
    async def scenario():
        queue: asyncio.Queue = asyncio.Queue()
        backlog = StepBacklog(queue, limit=2)
        for n in range(5):
            backlog.offer(0, Step("commit", {"n": n}))
        queue.put_nowait((0, "an update"))  # updates go straight to the queue
        waiting = [queue.get_nowait() for _ in range(queue.qsize())]
        assert [item for _, item in waiting] == [Step("commit", {"n": 0}), Step("commit", {"n": 1}), "an update"]
        backlog.taken()
        backlog.taken()
        backlog.offer(0, Step("commit", {"n": 5}))
        _, step = queue.get_nowait()
        assert step.payload == {"n": 5, "dropped_before": 3}
        formatted = StepFormatter(str, lambda: "ar").step(0, Step("commit", {**step.payload, "tokens": [7], "nfe": 1,
                                                                           "completion_tokens": 2}))
        assert formatted["dropped_before"] == 3 and formatted["token_ids"] == [7]
    asyncio.run(scenario())
