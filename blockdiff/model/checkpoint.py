"""Checkpoint: config + weights (internal names) + tokenizer; loading dispatch and saving."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from typing import Callable

import torch
from safetensors.torch import save_file

from blockdiff.config import ModelConfig
from blockdiff.errors import CheckpointError
from blockdiff.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # internal names, stored dtype
    tokenizer: Tokenizer | None
    path: str


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the model needs, internal name -> shape (Linear weights are [out, in])."""
    h, i, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, h)}
    for n in range(config.num_layers):
        p = f"layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    shapes["norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def check_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor],
                     locate: Callable[[str], tuple[str, str]] = lambda n: ("state_dict", n)) -> None:
    """Raise CheckpointError on a missing, unexpected or wrongly shaped tensor.

    `locate(internal_name)` gives (file, name in that file) so the message points at the source.
    """
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in state_dict]
    if missing:
        file, name = locate(missing[0])
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{file}: missing tensor {name}{more}")
    for n, t in state_dict.items():
        if n not in expected:
            file, name = locate(n)
            raise CheckpointError(f"{file}: unexpected tensor {name} (not in a model with this config)")
        if tuple(t.shape) != expected[n]:
            file, name = locate(n)
            raise CheckpointError(f"{file}: tensor {name} has shape {list(t.shape)}, expected {list(expected[n])}")


def load_checkpoint(path: str | os.PathLike, require_tokenizer: bool = True) -> Checkpoint:
    """A directory -> Hugging Face style loader; a .gguf file -> GGUF loader."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from blockdiff.model.loader_hf import load_hf
        return load_hf(path, require_tokenizer=require_tokenizer)
    if path.endswith(".gguf") and os.path.isfile(path):
        from blockdiff.model.loader_gguf import load_gguf
        return load_gguf(path, require_tokenizer=require_tokenizer)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(f"{path}: not a checkpoint (expected a directory with config.json or a .gguf file)")


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Group tensors in order into shards of at most max_bytes (one oversized tensor gets its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _write_weights(tensors: dict[str, torch.Tensor], out: str, max_bytes: int | None) -> list[str]:
    shards = _shards(tensors, max_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(os.path.join(out, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + ["model.safetensors.index.json"]


def _write_json(file: str, obj: dict) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _publish(tmp: str, out_dir: str) -> None:
    """Move the finished files into out_dir: one rename if it is new, else file by file, config.json last."""
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    new = set(os.listdir(tmp))
    # Weights of an earlier save with another sharding would be mixed in: remove them, keep other files.
    stale = [f for f in os.listdir(out_dir) if f not in new and f.startswith("model")
             and (f.endswith(".safetensors") or f == "model.safetensors.index.json")]
    for f in sorted(new, key=lambda f: f == "config.json"):
        os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
    for f in stale:
        os.remove(os.path.join(out_dir, f))


def save_checkpoint(ckpt: Checkpoint | tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None],
                    out_dir: str | os.PathLike, format: str | None = None,
                    max_shard_bytes: int | None = None) -> str:
    """Write config.json, generation_config.json, safetensors (sharded over max_shard_bytes) and
    tokenizer files to out_dir in format "llama" or "nld" (default: the config's). Returns out_dir."""
    from blockdiff.model.loader_hf import config_to_hf, stored_name
    if isinstance(ckpt, Checkpoint):
        config, state_dict, tokenizer = ckpt.config, ckpt.state_dict, ckpt.tokenizer
    else:
        config, state_dict, tokenizer = ckpt
    fmt = format or config.checkpoint_format
    if fmt not in ("llama", "nld"):
        raise ValueError(f"save_checkpoint: format must be 'llama' or 'nld', got {fmt!r}")
    config = replace(config, checkpoint_format=fmt)
    if config.tie_word_embeddings:  # the head is the embedding; safetensors refuses shared storage anyway
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    check_state_dict(config, state_dict)

    tensors, seen = {}, set()
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[stored_name(name, fmt)] = t.clone() if ptr in seen else t  # views of one storage: copy
        seen.add(ptr)

    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it becomes out_dir when new
        _write_weights(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids) or None,
               "pad_token_id": config.pad_token_id}
        _write_json(os.path.join(tmp, "generation_config.json"), gen)
        _write_json(os.path.join(tmp, "config.json"), config_to_hf(config, fmt))
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
