"""`blockdiff bench`: prompt sets, per-configuration metrics, perplexity, baselines and the CLI's files."""
import json
import math

import pytest
import torch

from blockdiff import sampling
from blockdiff.bench import BenchSettings, RunConfig, run_bench
from blockdiff.bench.prompts import builtin_sets, encode_prompts, load_prompts
from blockdiff.bench.report import mode_name
from blockdiff.bench.results import Run, Sample, summarize
from blockdiff.cli import main
from blockdiff.decoding.metrics import Metrics

PROMPTS = ['{"prompt": "the cat"}', "",
           '{"messages": [{"role": "user", "content": "hello there"}]}',
           '{"prompt": "def main():"}']


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    from blockdiff import LLM
    return LLM(tiny_dir, dtype="float32")


@pytest.fixture(scope="module")
def bench(llm, tiny_dir, prompt_file):
    settings = BenchSettings(model=tiny_dir, dtype="float32", prompt_set=prompt_file, modes=list(sampling.MODES),
                             block_lengths=[4], thresholds=[0.5, 0.9], max_new_tokens=8, batch_sizes=[1, 2])
    return run_bench(settings, llm)


def by_name(bench, name):
    return next(r for r in bench.results if r.name == name)


# --- prompt sets ----------------------------------------------------------------------------
def test_jsonl_reads_both_formats_and_encodes_like_llm(llm, prompt_file):
    prompts = load_prompts(prompt_file)
    assert [p.is_chat for p in prompts] == [False, True, False]  # the blank line is skipped
    assert prompts[1].messages == ({"role": "user", "content": "hello there"},)
    ids = encode_prompts(llm, prompts)
    assert ids[0] == llm.encode("the cat")
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True)
    assert ids[1] == llm.encode(chat, chat=True)  # what LLM.chat feeds the model
    assert len(load_prompts(prompt_file, 7)) == 7 and load_prompts(prompt_file, 7)[3] == prompts[0]  # cycled
    assert load_prompts(prompt_file, 2) == prompts[:2]


@pytest.mark.parametrize("line, reason", [
    ("{not json", "Expecting property name"),
    ('["a list"]', "expected a JSON object"),
    ('{"text": "x"}', 'exactly one of "prompt" or "messages"'),
    ('{"prompt": "x", "messages": []}', 'exactly one of "prompt" or "messages"'),
    ('{"prompt": ""}', '"prompt" must be a non-empty string'),
    ('{"messages": "hi"}', '"messages" must be a non-empty list'),
    ('{"messages": [{"role": "user"}]}', 'messages[0] must be an object'),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError) as e:
        load_prompts(str(path))
    assert str(e.value).startswith(f"{path}:3: ") and reason in str(e.value)


def test_missing_prompt_set_and_builtin_sets(tmp_path):
    with pytest.raises(ValueError, match="not a built-in set.*chat, code"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    assert {"chat", "code"} <= set(builtin_sets())
    chat, code = load_prompts("chat"), load_prompts("code")
    assert len(chat) == 16 and len(code) == 6 and all(p.is_chat for p in chat) and not any(p.is_chat for p in code)


# --- configurations --------------------------------------------------------------------------
def test_configs_sweep_only_what_each_mode_uses():
    s = BenchSettings(modes=["quad_spec", "diffusion"], block_lengths=[8, 16], quad_block_lengths=[4],
                      thresholds=[0.5, 0.9], batch_sizes=[1, 4])
    labels = [c.label for c in s.run_configs()]
    assert labels[:6] == ["ar", "quad_spec L4", "diffusion L8 t0.5", "diffusion L8 t0.9",  # ar always runs, first
                          "diffusion L16 t0.5", "diffusion L16 t0.9"]
    assert len(labels) == 12 and labels[6] == "ar bs4"
    engine_defaults = {"ar": 32, "diffusion": 8, "linear_spec": 5, "quad_spec": 2}
    default = BenchSettings(modes=["linear_spec", "quad_spec", "auto"]).run_configs(engine_defaults)
    assert [c.label for c in default] == ["ar", "linear_spec L5", "quad_spec L2", "auto"]
    assert default[-1].block_length is None  # each auto request takes its chosen mode's default
    with pytest.raises(ValueError, match="unknown mode.*allowed: " + ", ".join(sampling.MODES)):
        BenchSettings(modes=["nope"]).validate()
    with pytest.raises(ValueError, match="threshold"):
        BenchSettings(thresholds=[2.0]).validate()


def test_resolved_mode_is_shown_when_it_differs():
    def result(mode, resolved):
        samples = [Sample([5, 6], m, Metrics(generated_tokens=2, nfe=2, steps=2)) for m in resolved]
        return summarize("x", "blockdiff", 1, RunConfig(mode, 32, 0.9, 1), Run(samples, 1.0))
    assert mode_name(result("linear_spec", ["linear_spec"] * 2)) == "linear_spec"
    assert mode_name(result("auto", ["linear_spec"] * 2)) == "auto (→ linear_spec)"
    assert mode_name(result("auto", ["ar", "linear_spec", "ar"])) == "auto (→ ar 2, linear_spec 1)"


# --- one real run on the tiny model ------------------------------------------------------------
def test_metrics_are_consistent(bench):
    ours = [r for r in bench.results if r.kind == "blockdiff"]
    assert len(ours) == 2 * (len(sampling.MODES) + 1)  # every mode, diffusion at 2 thresholds, 2 batch sizes
    for r in ours:
        ms = [s.metrics for s in r.samples]
        assert len(r.samples) == bench.prompt_count == 3
        assert r.tokens == sum(len(s.token_ids) for s in r.samples) == sum(m.generated_tokens for m in ms)
        assert r.nfe == sum(m.nfe for m in ms) and r.tpf == pytest.approx(r.tokens / r.nfe)
        assert r.tok_s == pytest.approx(r.tokens / r.wall_s) and r.ttft_s > 0
        if r.mode == "auto":  # resolved per request, and the report says to what
            assert set(r.resolved_modes) <= {"ar", "linear_spec", "quad_spec"} and sum(r.resolved_modes.values()) == 3
            assert mode_name(r).startswith("auto (→ ")
        else:
            assert mode_name(r) == r.mode and r.resolved_modes == {r.mode: 3}
        if r.mode in ("linear_spec", "quad_spec", "auto"):
            # lossless at temperature 0 in float32: same tokens, so the same perplexity
            assert r.same_as_ar == 3 and r.same_as_ar_fraction == 1.0 and r.perplexity_vs_ar == pytest.approx(1.0)
        if r.mode in ("linear_spec", "quad_spec"):
            assert r.accept_rate_by_position and all(0.0 <= x <= 1.0 for x in r.accept_rate_by_position)
            assert 1.0 <= r.acceptance <= 4.0
        elif r.mode != "auto":
            assert r.accept_rate_by_position == [] and r.acceptance is None
    ar1, ar2 = by_name(bench, "ar"), by_name(bench, "ar bs2")
    assert [s.token_ids for s in ar1.samples] == [s.token_ids for s in ar2.samples]


def test_perplexity_matches_transformers(bench, llm, tiny_dir):
    """Teacher-forced NLL by transformers' own LlamaForCausalLM loaded from the checkpoint files."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    prompts = encode_prompts(llm, load_prompts(bench.settings.prompt_set))
    for name in ("ar", "diffusion L4 t0.5", "hf prompt lookup 10"):
        r = by_name(bench, name)
        total, count = 0.0, 0
        for ids, s in zip(prompts, r.samples):
            if not s.token_ids:
                continue
            full = torch.tensor([ids + s.token_ids])
            labels = full.clone()
            labels[0, :len(ids)] = -100  # score only the generated tokens
            with torch.no_grad():
                loss = hf(full, labels=labels).loss  # mean NLL over the generated tokens
            total += float(loss) * len(s.token_ids)
            count += len(s.token_ids)
            assert s.nll == pytest.approx(float(loss) * len(s.token_ids), rel=1e-4, abs=1e-4)
        assert r.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)


def test_baselines_run_and_are_compared_with_ar(bench):
    gen, lookup = by_name(bench, "hf generate()"), by_name(bench, "hf prompt lookup 10")
    assert by_name(bench, "hf generate() bs2").batch_size == 2
    for r in (gen, lookup):
        assert r.kind == "baseline" and r.tokens > 0 and r.tok_s > 0 and r.nfe is None
        assert r.same_as_ar is not None and r.perplexity is not None
    assert gen.same_as_ar == 3  # greedy, float32, the same weights: transformers agrees with our ar


# --- the CLI ----------------------------------------------------------------------------------
def test_cli_writes_json_table_and_plots(tiny_dir, prompt_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["bench", "--model", tiny_dir, "--dtype", "float32", "--prompt-set", prompt_file,
            "--modes", "linear_spec,diffusion", "--block-lengths", "4", "--thresholds", "0.5,0.9",
            "--max-new-tokens", "6", "--no-hf", "--out", str(out)]
    monkeypatch.setattr("sys.argv", ["blockdiff", *argv])  # what the entry point sees; bench records it
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "| mode" in stdout and "| linear_spec" in stdout and "acceptance rate by draft position" in stdout
    data = json.loads((out / "bench.json").read_text())
    assert "bench" in data["command"] and "--max-new-tokens 6" in data["command"]
    assert data["environment"]["torch"] == torch.__version__ and data["model"]["dtype"] == "float32"
    # ar runs although not asked for: it is the reference
    assert [r["name"] for r in data["results"]] == ["ar", "linear_spec L4", "diffusion L4 t0.5", "diffusion L4 t0.9"]
    assert data["results"][1]["samples"][0]["metrics"]["nfe"] > 0
    assert "| mode" in (out / "table.md").read_text()
    for png in ("tradeoff.png", "acceptance.png", "speed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_saves_the_acceptance_profile_the_engine_chooses_from(tiny_dir, prompt_file, tmp_path, capsys):
    from blockdiff import LLM
    from blockdiff.engine.block_lengths import load_profile
    from blockdiff.model.adapter import save_adapter
    from tests.support.models import attach_random_draft_adapter
    adapter = tmp_path / "adapter"
    save_adapter(attach_random_draft_adapter(LLM(tiny_dir, dtype="float32").model), adapter)
    argv = ["bench", "--model", tiny_dir, "--adapter", str(adapter), "--dtype", "float32", "--prompt-set", prompt_file,
            "--modes", "linear_spec,quad_spec", "--block-lengths", "5", "--quad-block-length", "3",
            "--max-new-tokens", "12", "--no-hf", "--no-llama-cpp", "--out", str(tmp_path / "out")]
    assert main(argv + ["--save-acceptance", str(adapter)]) == 0
    profile = load_profile(adapter)
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    measured = {r["config"]["mode"]: r["accept_rate_by_position"] for r in data["results"][1:]}
    assert profile.rates == {m: pytest.approx(rates, abs=1e-4) for m, rates in measured.items()}
    assert len(profile.rates["linear_spec"]) == 4 and len(profile.rates["quad_spec"]) == 2
    assert "blockdiff bench on 3" in profile.measured
    llm = LLM(tiny_dir, dtype="float32", adapter=str(adapter))  # the next load chooses from it
    assert llm.block_length_estimates is not None and 2 <= llm.block_lengths["linear_spec"] <= 5
    assert "default block lengths: " in capsys.readouterr().out

    for extra, reason in [(["--temperature", "0.5"], "use --temperature 0"),
                          (["--modes", "ar,diffusion"], "needs a spec mode"),
                          (["--batch-size", "3"], "need --spec-disable-batch-size never")]:
        assert main(argv + extra + ["--save-acceptance", str(adapter)]) == 2
        assert reason in capsys.readouterr().err
    assert main(argv + ["--save-acceptance", str(tmp_path)]) == 2
    assert "is not a draft adapter directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's usage error
        main(argv + ["--spec-disable-batch-size", "1"])
    assert "expected auto, never or an integer >= 2, got '1'" in capsys.readouterr().err


def test_cli_bad_mode_is_one_line(capsys):
    assert main(["bench", "--modes", "ar,nope", "--model", "/nonexistent"]) == 2  # fails before loading
    err = capsys.readouterr().err
    assert "unknown mode(s) nope" in err and "Traceback" not in err


def test_llama_cpp_baseline_says_why_it_is_skipped(llm, gguf_path):
    """llama.cpp reads GGUF files only, and is an optional extra."""
    from blockdiff.bench.baselines import llama_cpp_model
    model, skipped = llama_cpp_model(llm, 1)
    assert model is None and "is not a GGUF file" in skipped

    class GGUFModel:  # the check reads only the path
        model_path, max_context = gguf_path, 256
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        model, skipped = llama_cpp_model(GGUFModel(), 1)
        assert model is None and "make llama" in skipped
    else:
        pytest.skip("llama-cpp-python is installed here; the bench runs it (benchmarks/RESULTS.md)")


@pytest.mark.slow
def test_llama_cpp_decodes_what_we_decode_from_the_same_gguf(default_llm):
    """Where the [llama] extra is installed (`make llama`), llama.cpp, an independent engine on
    the same Q4_1 file, picks our greedy tokens wherever the choice is clear: up to the first
    step whose top two logits lie within CLEAR nats. It multiplies by 8-bit-quantized
    activations, so near-ties may go the other way (5/16 answers identical over 64 tokens in
    benchmarks/RESULTS.md)."""
    pytest.importorskip("llama_cpp", reason="the llama.cpp baseline is an optional extra (make llama)")
    from blockdiff.bench.baselines import llama_cpp_model, run_llama_cpp
    CLEAR, N = 0.5, 8
    model, skipped = llama_cpp_model(default_llm, 2)
    assert skipped is None
    prompts = [default_llm.encode(p) for p in ("The capital of France is", "def fibonacci(n):",
                                               "The first three planets from the sun are", "1, 2, 3, 4,")]
    theirs = run_llama_cpp(model, default_llm, prompts, max_new_tokens=N).samples
    ours = default_llm.generate(prompts, max_new_tokens=N, ignore_eos=True, use_tqdm=False)
    compared = 0
    for prompt, their, our in zip(prompts, theirs, ours):
        ids = prompt + our.token_ids
        with torch.inference_mode():
            logits = default_llm.model.logits(default_llm.model(torch.tensor([ids])))[0, len(prompt) - 1:-1]  # (N, V)
        top2 = logits.topk(2).values  # (N, 2)
        clear = next((i for i, gap in enumerate((top2[:, 0] - top2[:, 1]).tolist()) if gap < CLEAR), N)
        assert their.token_ids[:clear] == our.token_ids[:clear]
        compared += clear
    assert compared >= 8  # the check compared something
