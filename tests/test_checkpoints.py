"""Checkpoint loading/saving: GGUF parity with transformers, HF/NLD round trips, bad inputs."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from blockdiff.config import ModelConfig, RopeConfig
from blockdiff.errors import CheckpointError
from blockdiff.model.checkpoint import expected_shapes, load_checkpoint, save_checkpoint
from blockdiff.model.loader_hf import config_from_hf
from blockdiff.tokenizer import Tokenizer
from support.models import tiny_tokenizer

TEXTS = ["Hello world", "héllo wörld — 日本語 🤖 naïve café", "def f(x):\n    return x**2  # 12345\n",
         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "a 123 4567 b1c2", "  two  spaces\t\ttabs\n\n\n",
         "I'm sure they'll say we've"]
CHATS = [[{"role": "user", "content": "Hi there"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? ünïcode"}]]


# --- SmolLM2 GGUF vs transformers (an independent loader); fixtures in conftest.py ------------
@pytest.fixture(scope="module")
def ours(gguf_path):
    return load_checkpoint(gguf_path)


def test_gguf_config(ours, gguf_path):
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == \
        (30, 576, 1536, 9, 3, 64)
    assert (c.vocab_size, c.rope.theta, c.rms_norm_eps, c.max_position_embeddings) == (49152, 1e5, 1e-5, 8192)
    assert c.tie_word_embeddings and "lm_head.weight" not in ours.state_dict
    assert (c.bos_token_id, c.eos_token_ids, c.rope.yarn_factor) == (1, [2], None)
    assert ours.path == gguf_path


def test_gguf_weights_match_transformers(ours, hf_model):
    theirs = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    assert set(theirs) == set(ours.state_dict)
    for name, w in ours.state_dict.items():
        assert w.dtype == torch.float32, name
        if not torch.equal(w, theirs[name]):  # exact is expected; the tolerance only allows float noise
            torch.testing.assert_close(w, theirs[name], atol=1e-6, rtol=0, msg=name)
    c = hf_model.config
    assert (c.num_hidden_layers, c.num_key_value_heads, c.tie_word_embeddings) == (30, 3, True)


def test_gguf_tokenizer_matches_transformers(ours, hf_tokenizer):
    tok = ours.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>user") == [1, 4093]  # control tokens match whole
    assert tok.decode([1, 4093, 2]) == "user"  # and are dropped when skipping specials
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids) == (49152, 1, [2])
    assert {0, 1, 2} <= tok.special_token_ids and 4093 not in tok.special_token_ids
    assert tok.token_str(1) == "<|im_start|>"


@pytest.mark.parametrize("messages", CHATS)
def test_gguf_chat_template_matches_transformers(ours, hf_tokenizer, messages):
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.tokenizer.apply_chat_template(messages) == theirs
    assert ours.tokenizer.apply_chat_template(messages, add_generation_prompt=False) == \
        hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def test_tokenizer_save_and_from_dir(ours, tmp_path):
    ours.tokenizer.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == ours.tokenizer.encode(text)
    assert again.apply_chat_template(CHATS[1]) == ours.tokenizer.apply_chat_template(CHATS[1])
    assert (again.bos_token_id, again.eos_token_ids, again.special_token_ids) == \
        (1, [2], ours.tokenizer.special_token_ids)


def test_no_chat_template_is_a_clear_error(ours):
    bare = Tokenizer(ours.tokenizer.tok)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(CHATS[0])


# --- tiny random checkpoints: save/load round trips -----------------------------------------
def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                bos_token_id=1, eos_token_ids=[2], mask_token_id=3, block_size=16,
                rope=RopeConfig(theta=1e6, yarn_factor=4.0, yarn_original_max=512, llama4_beta=0.1,
                                llama4_original_max=512))
    return ModelConfig(**{**base, **kw})


def random_state_dict(config: ModelConfig, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in expected_shapes(config).items()}


@pytest.mark.parametrize("fmt", ["llama", "nld"])
@pytest.mark.parametrize("shard", [None, 30_000])
def test_save_load_round_trip(tmp_path, fmt, shard):
    config, sd, tok = tiny_config(), random_state_dict(tiny_config(), torch.bfloat16), tiny_tokenizer()
    out = save_checkpoint((config, sd, tok), tmp_path / "ckpt", format=fmt, max_shard_bytes=shard)
    files = os.listdir(out)
    assert ("model.safetensors.index.json" in files) == (shard is not None)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dir left behind
    ck = load_checkpoint(out)
    assert ck.config == dataclasses.replace(config, checkpoint_format=fmt)
    assert set(ck.state_dict) == set(sd)
    assert all(torch.equal(ck.state_dict[k], v) and ck.state_dict[k].dtype == torch.bfloat16 for k, v in sd.items())
    assert ck.tokenizer.encode("the cat") == tok.encode("the cat")
    assert ck.tokenizer.apply_chat_template(CHATS[0]) == "<s>user: Hi there</s>"
    head = "diffusion_head.weight" if fmt == "nld" else "lm_head.weight"
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert raw["model_type"] == ("nemotron_labs_diffusion" if fmt == "nld" else "llama")
    if shard:
        index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
        assert head in index["weight_map"]


@pytest.mark.parametrize("tied", [False, True])
def test_llama_format_loads_in_transformers(tmp_path, tied):
    from transformers import LlamaForCausalLM
    config = tiny_config(tie_word_embeddings=tied)
    sd = random_state_dict(config)
    save_checkpoint((config, sd, tiny_tokenizer()), tmp_path, format="llama", max_shard_bytes=50_000)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    theirs = model.state_dict()
    for name, w in sd.items():
        assert torch.equal(theirs["model." + name if name != "lm_head.weight" else name], w), name
    if tied:
        assert torch.equal(theirs["lm_head.weight"], sd["embed_tokens.weight"])
    assert model.config.rope_parameters["factor"] == 4.0


def test_overwrite_replaces_weights_and_keeps_other_files(tmp_path):
    config = tiny_config()
    save_checkpoint((config, random_state_dict(config), None), tmp_path, max_shard_bytes=30_000)
    (tmp_path / "linear_spec_lora").mkdir()
    sd = {k: v + 1 for k, v in random_state_dict(config).items()}
    save_checkpoint((config, sd, None), tmp_path)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("model-")]
    assert (tmp_path / "linear_spec_lora").is_dir()
    ck = load_checkpoint(tmp_path, require_tokenizer=False)
    assert all(torch.equal(ck.state_dict[k], v) for k, v in sd.items())


def test_ministral3_nested_config_matches_transformers_rope():
    from transformers import Ministral3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    theirs = Ministral3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=300)
    d = {"model_type": "mistral3", "text_config": theirs.to_dict()}
    c = config_from_hf(d, "config.json")
    assert (c.num_layers, c.hidden_size, c.head_dim, c.checkpoint_format) == (2, 64, 16, "llama")
    r = c.rope
    assert (r.theta, r.yarn_factor, r.yarn_original_max, r.llama4_beta, r.llama4_original_max) == \
        (1e6, 16.0, 16384, 0.1, 16384)
    _, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](theirs, "cpu")
    assert r.yarn_attention_factor == pytest.approx(attention_factor)


def test_old_style_rope_scaling():
    d = {"model_type": "mistral", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 5e5, "max_position_embeddings": 8192,
         "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}}
    r = config_from_hf(d, "config.json").rope
    assert (r.theta, r.yarn_factor, r.yarn_original_max, r.yarn_attention_factor, r.llama4_beta) == \
        (5e5, 2.0, 4096, None, None)
    with pytest.raises(CheckpointError, match="rope type 'llama3' is not supported"):
        config_from_hf({**d, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "config.json")


# --- bad inputs ----------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    config = tiny_config()
    save_checkpoint((config, random_state_dict(config), tiny_tokenizer()), tmp_path / "m", format="llama")
    return tmp_path / "m"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(saved, damage):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"garbage": os.urandom(5000), "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        load_checkpoint(saved)


def test_missing_shard(tmp_path):
    config = tiny_config()
    save_checkpoint((config, random_state_dict(config), None), tmp_path, max_shard_bytes=30_000)
    shard = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{shard}: shard listed in model.safetensors.index.json"):
        load_checkpoint(tmp_path, require_tokenizer=False)


@pytest.mark.parametrize("keep", [0, 100, 2_000_000, 60_000_000])
def test_truncated_gguf(gguf_path, tmp_path, keep):
    bad = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as src:
        bad.write_bytes(src.read(keep))
    with pytest.raises(CheckpointError, match=r"cut\.gguf: "):
        load_checkpoint(bad)


def test_gguf_unknown_architecture_and_tokenizer(tmp_path):
    import gguf
    import numpy as np
    for arch, tok_model, match in [("gpt2", "gpt2", "architecture 'gpt2' is not supported"),
                                   ("llama", "llama", "tokenizer model 'llama' is not supported")]:
        path = tmp_path / f"{arch}-{tok_model}.gguf"
        w = gguf.GGUFWriter(str(path), arch)
        for key, val in [("embedding_length", 8), ("block_count", 1), ("feed_forward_length", 8),
                         ("attention.head_count", 2), ("vocab_size", 4)]:
            w.add_uint32(f"{arch}.{key}", val)
        w.add_tokenizer_model(tok_model)
        w.add_token_list(["a", "b", "c", "d"])
        shapes = {"token_embd.weight": (4, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
                  "blk.0.ffn_norm.weight": (8,), "blk.0.ffn_down.weight": (8, 8)}
        shapes.update({f"blk.0.{n}.weight": (8, 8) for n in
                       ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")})
        for name, shape in shapes.items():
            w.add_tensor(name, np.ones(shape, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path)


def test_missing_tokenizer_json(saved):
    (saved / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=f"no tokenizer.json in {saved}"):
        load_checkpoint(saved)
    assert load_checkpoint(saved, require_tokenizer=False).tokenizer is None


def test_missing_config_json(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(saved)


def _rewrite_config(saved, **changes):
    d = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**d, **changes}))


def test_wrong_tensor_shape(saved):
    _rewrite_config(saved, num_key_value_heads=4)  # k/v on disk are [32, 64], the config wants [64, 64]
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight "
                             r"has shape \[32, 64\], expected \[64, 64\]"):
        load_checkpoint(saved)


def test_unknown_model_type(saved):
    _rewrite_config(saved, model_type="gpt_neox")
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'gpt_neox' is not supported; supported: "
                                              r"llama, mistral, ministral, ministral3, nemotron_labs_diffusion"):
        load_checkpoint(saved)


def test_missing_and_unexpected_tensors(saved):
    _rewrite_config(saved, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor model\.layers\.2\.self_attn"):
        load_checkpoint(saved)
    _rewrite_config(saved, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor model\.layers\.1\."):
        load_checkpoint(saved)
    _rewrite_config(saved, num_hidden_layers=2, model_type="nemotron_labs_diffusion")  # llama names, nld config
    with pytest.raises(CheckpointError, match=r"unexpected tensor lm_head\.weight \(not part of a nld-format checkpoint\)"):
        load_checkpoint(saved)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="weights.bin: not a checkpoint"):
        load_checkpoint(tmp_path / "weights.bin")
    with pytest.raises(CheckpointError, match="nowhere: no such file"):
        load_checkpoint(tmp_path / "nowhere")
