"""lm-evaluation-harness (`lm_eval --model local-completions`, from PyPI) against a live
`blockdiff serve`, on the task set the repository ships (benchmarks/lm_eval_tasks): its
loglikelihood task goes through `echo` + `logprobs`, its generation task through plain
completions, its tokenizer through /tokenize. Every per-sample number it logs is checked
against the same computation done in-process."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from blockdiff import SamplingParams
from support.models import causal_logprobs
from support.server import free_port

pytestmark = pytest.mark.slow  # processes, servers or a browser: `make test` only

ROOT = Path(__file__).resolve().parents[1]
TASKS = "blockdiff_qa_choice,blockdiff_qa,blockdiff_code"
LIMIT = 4
STOPS = {"blockdiff_qa": ["\n"], "blockdiff_code": ["\ndef ", "\nclass ", "\nif __name__", "\n#"]}
MAX_TOKENS = {"blockdiff_qa": 16, "blockdiff_code": 64}


@pytest.fixture(scope="module")
def served_default_model():
    """The default model, in float32 like the `default_llm` fixture it is compared with."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "blockdiff.cli", "serve", "--dtype", "float32",
                               "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # loading times forwards; a busy 2-core machine is slow
        while True:
            if server.poll() is not None:
                pytest.fail(f"blockdiff serve exited: {server.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("blockdiff serve did not answer /health within 300 s")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def lm_eval_run(served_default_model, tmp_path_factory):
    """One lm_eval run over both tasks; returns (results, {task: samples})."""
    out = tmp_path_factory.mktemp("lm_eval")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                    f"model=SmolLM2-135M-Instruct,base_url={served_default_model}/v1/completions,num_concurrent=1,max_retries=1",
                    "--tasks", TASKS, "--include_path", "benchmarks/lm_eval_tasks", "--limit", str(LIMIT),
                    "--output_path", str(out), "--log_samples"], cwd=ROOT, env=env, check=True, timeout=600,
                   capture_output=True)
    results = json.loads(Path(glob.glob(f"{out}/**/results_*.json", recursive=True)[0]).read_text())
    samples = {}
    for task in TASKS.split(","):
        path = glob.glob(f"{out}/**/samples_{task}_2*.jsonl", recursive=True)[0]  # _2: the timestamp
        samples[task] = [json.loads(line) for line in open(path)]
    return results, samples


def loglikelihood(llm, context: str, continuation: str) -> float:
    """lm-eval's split (the whole string's tokens after the context's) scored by one causal forward."""
    ctx = llm.tokenizer.encode(context)
    whole = llm.tokenizer.encode(context + continuation)
    logprobs = causal_logprobs(llm.model, whole)  # (T, V)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_multiple_choice_scores_equal_in_process_ones(lm_eval_run, default_llm):
    llm = default_llm
    results, samples = lm_eval_run
    docs = samples["blockdiff_qa_choice"]
    assert len(docs) == LIMIT
    correct = []
    for sample in docs:
        doc = sample["doc"]
        context = f"Q: {doc['question']}\nA:"
        served = [float(resp[0][0]) for resp in sample["resps"]]
        ours = [loglikelihood(llm, context, " " + choice) for choice in doc["choices"]]
        assert served == pytest.approx(ours, abs=1e-3)
        correct.append(max(range(len(ours)), key=ours.__getitem__) == doc["label"])
    assert results["results"]["blockdiff_qa_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


@pytest.mark.parametrize("task", ["blockdiff_qa", "blockdiff_code"])
def test_generations_equal_in_process_ones(lm_eval_run, default_llm, task):
    llm = default_llm
    results, samples = lm_eval_run
    docs = samples[task]
    assert len(docs) == LIMIT
    prompts = [s["arguments"]["gen_args_0"]["arg_0"] for s in docs]  # the context lm-eval built
    params = SamplingParams(max_new_tokens=MAX_TOKENS[task], stop=STOPS[task])
    texts = [o.text for o in llm.generate([llm.tokenizer.encode(p) for p in prompts], params, use_tqdm=False)]
    assert [s["resps"][0][0] for s in docs] == texts
    assert all(texts)  # the model answers: the comparison above is not between empty strings
    if task == "blockdiff_qa":
        assert results["results"][task]["exact_match,strip"] == pytest.approx(
            sum(s["exact_match"] for s in docs) / LIMIT)
