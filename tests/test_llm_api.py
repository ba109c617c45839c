"""The public API: LLM + SamplingParams, NLD/Llama equivalence, draft adapters, bad input."""
import pytest
import torch

from blockdiff import LLM, SamplingParams
from blockdiff.errors import CheckpointError
from blockdiff.model.adapter import load_adapter, save_adapter
from blockdiff.model.kv_cache import KVCache
from support.models import attach_random_draft_adapter, run, save_tiny_checkpoint, tiny_model


def test_generate_returns_text_ids_and_metrics(tiny_dir):
    llm = LLM(tiny_dir, dtype="float32")
    outs = llm.generate(["the cat", "def main"], SamplingParams(mode="linear_spec", max_new_tokens=9,
                                                                block_length=4), use_tqdm=False)
    assert len(outs) == 2
    for out in outs:
        assert out.text == llm.tokenizer.decode(out.token_ids)
        m = out.metrics
        assert m.generated_tokens == len(out.token_ids) and m.nfe > 0 and m.steps > 0
        assert m.tpf == len(out.token_ids) / m.nfe and m.acceptance >= 1 and m.wall_s > 0
    # keyword arguments build or override the SamplingParams
    again = llm.generate("the cat", mode="ar", max_new_tokens=9, use_tqdm=False)[0]
    assert again.token_ids == outs[0].token_ids


def test_chat_applies_the_template(tiny_dir):
    llm = LLM(tiny_dir, dtype="float32")
    out = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_new_tokens=4), use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("<s>user: hello</s>")


def test_nld_format_gives_the_same_logits_as_llama_naming(tmp_path):
    llama = LLM(save_tiny_checkpoint(tmp_path / "llama", "llama", seed=3), dtype="float32")
    nld = LLM(save_tiny_checkpoint(tmp_path / "nld", "nld", seed=3), dtype="float32")
    assert (tmp_path / "nld" / "model.safetensors").exists() or (tmp_path / "nld" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 299, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(llama.model.logits(llama.model(ids)), nld.model.logits(nld.model(ids)))
    assert nld.config.checkpoint_format == "nld" and nld.config.mask_token_id == 3


def test_sharded_nld_checkpoint_round_trips(tmp_path):
    from blockdiff.model.checkpoint import save_checkpoint, load_checkpoint
    src = LLM(save_tiny_checkpoint(tmp_path / "a", "nld", seed=4), dtype="float32")
    state = {k: v for k, v in src.model.state_dict().items()}
    save_checkpoint((src.config, state, src.tokenizer), tmp_path / "b", format="nld", max_shard_bytes=20_000)
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    again = LLM(str(tmp_path / "b"), dtype="float32")
    ids = torch.randint(0, 299, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(src.model.logits(src.model(ids)), again.model.logits(again.model(ids)))
    assert load_checkpoint(str(tmp_path / "b")).config.checkpoint_format == "nld"


def test_draft_adapter_changes_drafts_but_never_ar(tmp_path):
    base = tiny_model(6, vocab=24)
    adapted = attach_random_draft_adapter(tiny_model(6, vocab=24))
    save_adapter(adapted, tmp_path / "adapter")
    loaded = tiny_model(6, vocab=24)
    load_adapter(loaded, tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5, 23, 23, 23]])
    with torch.inference_mode():
        assert torch.equal(base(ids), loaded(ids))  # no gate: the base model, bit for bit
        gate = torch.ones_like(ids, dtype=torch.bool)
        assert not torch.allclose(base(ids, pattern="bidirectional"), loaded(ids, pattern="bidirectional", adapter_gate=gate))
    prompt = [[1, 2, 3]]
    ar = run(base, prompt, mode="ar", max_new_tokens=20)[0].output_ids
    for mode in ["linear_spec", "quad_spec"]:
        assert run(loaded, prompt, mode=mode, max_new_tokens=20, block_length=5)[0].output_ids == ar


def test_diffusion_denoises_with_the_draft_adapter_on():
    """A draft adapter is what learned to denoise when the base is a plain AR model. At threshold
    0 the first denoising pass fills the whole block, so the block must be the adapter's argmax."""
    model = attach_random_draft_adapter(tiny_model(6, vocab=24))
    prompt, L, mask = [1, 2, 3], 5, model.config.mask_token_id
    out = run(model, [prompt], mode="diffusion", threshold=0.0, block_length=L, max_new_tokens=L)[0].output_ids
    cache = KVCache(model.config, 1, len(prompt) + L, torch.float32, torch.device("cpu"))
    block = torch.tensor([[out[0]] + [mask] * (L - 1)])  # (1, L): the seed token, then MASKs
    with torch.inference_mode():
        model(torch.tensor([prompt]), None, cache, "causal")
        cache.advance(len(prompt))
        adapter_on = model(block, None, cache, "bidirectional", adapter_gate=torch.ones_like(block, dtype=torch.bool))
        adapter_off = model(block, None, cache, "bidirectional")
        drafted = model.logits(adapter_on[0, 1:]).argmax(-1).tolist()
        base_drafts = model.logits(adapter_off[0, 1:]).argmax(-1).tolist()
    assert out[1:] == drafted
    assert drafted != base_drafts  # the adapter changes this block, so the check above has teeth


def test_bad_adapter_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(tiny_model(0), tmp_path)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="warp"), "unknown mode 'warp'; allowed: ar, diffusion, linear_spec, quad_spec"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(block_length=0), "block_length"), (dict(block_length=-4), "block_length"),
    (dict(threshold=1.01), "threshold"), (dict(threshold=-0.5), "threshold"),
    (dict(temprature=0.3), "unknown sampling parameter"),
])
def test_bad_parameters_fail_cleanly_and_leave_the_engine_usable(tiny_dir, kwargs, match):
    llm = LLM(tiny_dir, dtype="float32")
    before = llm.generate("the cat", max_new_tokens=6, use_tqdm=False)[0].token_ids
    with pytest.raises(ValueError, match=match):
        llm.generate("the cat", use_tqdm=False, **kwargs)
    assert llm.generate("the cat", max_new_tokens=6, use_tqdm=False)[0].token_ids == before


def test_bad_prompts_fail_cleanly(tiny_dir):
    llm = LLM(tiny_dir, dtype="float32")
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError, match="context is 256"):
        llm.generate([[5] * 300], use_tqdm=False)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        llm.generate([[5] * 200], max_new_tokens=100, use_tqdm=False)
    # one bad prompt in a batch rejects the batch before any decoding starts
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["the cat", ""], use_tqdm=False)


def test_bad_constructor_arguments(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown dtype"):
        LLM(tiny_dir, dtype="fp8")
    with pytest.raises(CheckpointError, match="no such model"):
        LLM(str(tmp_path / "missing"))
