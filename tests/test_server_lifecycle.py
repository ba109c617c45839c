"""`blockdiff serve` as a real process: ready when /health says so, and SIGTERM mid-stream
lets the in-flight request finish (or end cleanly), then exits without hanging. Also the
stream text tracker, checked against Sequence's own stop-string cut, and the thread the model
loads on."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockdiff.decoding.sequence import Sequence
from blockdiff.engine.request import Update
from blockdiff.sampling import SamplingParams
from blockdiff.server.commands import on_a_passing_thread
from blockdiff.server.streaming import TextTracker, held_back
from support.models import tiny_tokenizer
from support.server import free_port, make_tiny_checkpoint

pytestmark = pytest.mark.slow  # processes, servers or a browser: `make test` only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigterm_lets_the_stream_finish_and_exits(tmp_path):
    model = make_tiny_checkpoint(str(tmp_path / "tiny"))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "blockdiff.cli", "serve", "--model", model, "--port", str(port),
                             "--dtype", "float32", "--threads", "1", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("server never became healthy")
        events, first = [], threading.Event()

        def client():
            body = {"prompt": "the cat", "max_tokens": 400, "ignore_eos": True, "stream": True, "mode": "ar"}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        first.set()

        t = threading.Thread(target=client, daemon=True)
        t.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        t.join(40)
        assert not t.is_alive()
        assert proc.wait(40) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][len("data: "):])
        # finished normally, or was told why it was cut short: never a silent drop
        assert "error" in last or last["choices"][0]["finish_reason"] == "length"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_model_loads_on_a_thread_that_ends_and_its_errors_reach_the_caller():
    """serve loads off the main thread so the engine thread holds the process's only OpenMP
    pool (server/commands.py)."""
    ran_on = []
    assert on_a_passing_thread(lambda: ran_on.append(threading.current_thread()) or 7) == 7
    assert ran_on[0] is not threading.current_thread() and not ran_on[0].is_alive()

    def failing():
        raise FileNotFoundError("no such model: nowhere")

    with pytest.raises(FileNotFoundError, match="no such model"):
        on_a_passing_thread(failing)


def test_held_back_is_the_longest_stop_prefix():
    assert held_back("abc", ["cd"]) == 1
    assert held_back("abcx", ["cd"]) == 0
    assert held_back("xxab", ["abc", "b"]) == 2
    assert held_back("", ["abc"]) == 0


TOK = tiny_tokenizer()
WORDS = ["the", " cat", " sat", " on", " mat", "\n", "é", "日本", "def", " return", "!"]


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), stop=st.sampled_from(WORDS + ["at o", "n m"]),
       chunk=st.integers(1, 5))
def test_streamed_text_is_a_prefix_of_the_final_text_and_stops_before_the_stop(words, stop, chunk):
    ids = TOK.encode("".join(words))
    seq = Sequence([1], SamplingParams(max_new_tokens=100, stop=[stop]), frozenset(), TOK.decode)
    tracker, streamed = TextTracker(TOK.decode, [stop]), ""
    for i in range(0, len(ids), chunk):  # blocks of `chunk` tokens, as a spec step commits them
        seq.append(ids[i:i + chunk])
        done = seq.finished or i + chunk >= len(ids)
        update = Update(list(seq.output_ids), 0, (seq.finish_reason or "length") if done else None, seq.stop_text_end)
        streamed += tracker.advance(update)
        if done:
            break
    final = tracker.final_text(update)
    assert streamed == final
    assert stop not in final
    full = TOK.decode(ids)
    assert final == (full[:full.index(stop)] if stop in full else full)
