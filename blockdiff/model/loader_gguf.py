"""GGUF (llama.cpp) checkpoints of the llama architecture: dequantized to float32, internal names."""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch

from blockdiff.config import ModelConfig, RopeConfig
from blockdiff.errors import CheckpointError
from blockdiff.model.checkpoint import Checkpoint, check_state_dict
from blockdiff.tokenizer import Tokenizer

# GGUF tensor name (after "blk.N.") -> internal name (after "layers.N.").
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _internal_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def _f32(x: float) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06; keep the short spelling."""
    return float(str(np.float32(x)))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> HF's half-split layout)."""
    out, inp = w.shape
    # [n_head, 2, out/n_head/2, in] was written as [n_head, out/n_head/2, 2, in]: swap back.
    return w.reshape(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _config(get: Any, names: set[str], path: str) -> ModelConfig:
    """Hyperparameters from llama.* metadata; `get(key, default)` reads a field."""
    try:
        hidden, heads = int(get("llama.embedding_length")), int(get("llama.attention.head_count"))
        head_dim = int(get("llama.attention.key_length", hidden // heads))
        rot = get("llama.rope.dimension_count")
        if rot is not None and int(rot) != head_dim:
            raise CheckpointError(f"{path}: partial rotary ({rot} of {head_dim} dims) is not supported")
        rope = RopeConfig(theta=_f32(get("llama.rope.freq_base", 10000.0)))
        scaling = get("llama.rope.scaling.type", "none")
        if scaling == "yarn":
            rope.yarn_factor = _f32(get("llama.rope.scaling.factor"))
            rope.yarn_original_max = int(get("llama.rope.scaling.original_context_length"))
            rope.yarn_beta_fast = _f32(get("llama.rope.scaling.yarn_beta_fast", 32.0))
            rope.yarn_beta_slow = _f32(get("llama.rope.scaling.yarn_beta_slow", 1.0))
        elif scaling != "none":
            raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported (none or yarn)")
        tokens = get("tokenizer.ggml.tokens", None)
        vocab = get("llama.vocab_size", len(tokens) if tokens else None)
        eos = [get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        return ModelConfig(
            vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get("llama.feed_forward_length")),
            num_layers=int(get("llama.block_count")), num_heads=heads,
            num_kv_heads=int(get("llama.attention.head_count_kv", heads)), head_dim=head_dim,
            rms_norm_eps=_f32(get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(get("llama.context_length", 2048)),
            tie_word_embeddings="output.weight" not in names, rope=rope,
            bos_token_id=get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=list(dict.fromkeys(int(e) for e in eos if e is not None)),
            pad_token_id=get("tokenizer.ggml.padding_token_id"), checkpoint_format="llama")
    except (TypeError, ValueError) as e:  # a required field is absent (None) or malformed
        raise CheckpointError(f"{path}: bad or missing llama.* metadata ({e})") from e


def _tensor(t: Any, path: str, file_size: int) -> torch.Tensor:
    """Dequantize one reader tensor to float32 in torch order ([out, in])."""
    from gguf.quants import dequantize
    if t.data_offset + t.n_bytes > file_size or t.data.nbytes != t.n_bytes:
        raise CheckpointError(f"{path}: tensor {t.name} runs past the end of the file (truncated?)")
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
    try:
        arr = dequantize(t.data, t.tensor_type).reshape(shape)
    except (NotImplementedError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot dequantize tensor {t.name} ({e})") from e
    if not arr.flags.writeable:  # an unquantized tensor is a view of the reader's read-only memmap
        arr = arr.copy()
    return torch.from_numpy(arr.astype(np.float32, copy=False))


def load_gguf(path: str | os.PathLike, require_tokenizer: bool = True) -> Checkpoint:
    """Load a llama-architecture GGUF: weights as float32 with HF Q/K layout, tokenizer from metadata."""
    import gguf
    path = os.fspath(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails with ValueError, IndexError, struct errors ... on bad files
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from e

    def get(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    config = _config(get, names, path)

    file_size = os.path.getsize(path)
    state_dict: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _internal_name(t.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name} (not supported in a llama GGUF)")
        state_dict[name] = _tensor(t, path, file_size)
    gguf_names = {v: k for k, v in _TOP_NAMES.items()}

    def locate(name: str) -> tuple[str, str]:
        if name in gguf_names:
            return path, gguf_names[name]
        n, rest = name.split(".", 2)[1:]
        short = {v: k for k, v in _LAYER_NAMES.items()}[rest.removesuffix(".weight")]
        return path, f"blk.{n}.{short}.weight"
    check_state_dict(config, state_dict, locate)
    for name, w in state_dict.items():  # after the shape check, so the reshape cannot fail
        if name.endswith("q_proj.weight"):
            state_dict[name] = _unpermute(w, config.num_heads)
        elif name.endswith("k_proj.weight"):
            state_dict[name] = _unpermute(w, config.num_kv_heads)

    tokenizer = None
    if "tokenizer.ggml.tokens" in reader.fields:
        tokenizer = Tokenizer.from_gguf(reader, path)
    elif require_tokenizer:
        raise CheckpointError(f"{path}: no tokenizer in this GGUF (no tokenizer.ggml.tokens)")
    return Checkpoint(config=config, state_dict=state_dict, tokenizer=tokenizer, path=path)
