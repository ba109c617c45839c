"""Hugging Face style checkpoint directories (Llama/Mistral/Ministral-3 and NLD): read and write.

Reading: config.json -> ModelConfig, safetensors (single or sharded) -> internal parameter names.
Writing: the reverse name mapping and a config.json that transformers (llama) or NLD code accepts.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors import safe_open

from blockdiff.config import ModelConfig, RopeConfig
from blockdiff.errors import CheckpointError
from blockdiff.model.checkpoint import Checkpoint, check_state_dict
from blockdiff.tokenizer import Tokenizer

LLAMA_TYPES = ("llama", "mistral", "ministral", "ministral3")
NLD_TYPE = "nemotron_labs_diffusion"
SUPPORTED_TYPES = (*LLAMA_TYPES, NLD_TYPE)
INDEX_FILE = "model.safetensors.index.json"
# Stored prefixes of the decoder body, per format; VLM wrappers (Mistral-3) nest the text model.
_BODY_PREFIXES = {"llama": ("model.language_model.", "language_model.model.", "model."), "nld": ("encoder.",)}
_HEAD_NAMES = {"llama": ("lm_head.weight", "language_model.lm_head.weight"), "nld": ("diffusion_head.weight",)}
# Stored tensors that carry nothing we need: recomputed rotary tables, a VLM's vision side.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_IGNORED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


# --- names ---------------------------------------------------------------------------------
def stored_name(name: str, fmt: str) -> str:
    """Internal parameter name -> the name written to disk in format `fmt` ("llama" or "nld")."""
    if name == "lm_head.weight":
        return _HEAD_NAMES[fmt][0]
    return _BODY_PREFIXES[fmt][-1] + name


def internal_name(stored: str, fmt: str) -> str | None:
    """Name on disk -> internal name; None for a tensor that belongs to no known parameter."""
    if stored in _HEAD_NAMES[fmt]:
        return "lm_head.weight"
    for prefix in _BODY_PREFIXES[fmt]:
        if stored.startswith(prefix):
            return stored[len(prefix):]
    return None


# --- config.json -> ModelConfig ------------------------------------------------------------
def _rope_from_hf(d: dict, max_pos: int, where: str) -> RopeConfig:
    """RoPE from transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    rope = RopeConfig(theta=theta)
    if kind == "yarn":
        orig = int(params.get("original_max_position_embeddings") or max_pos)
        factor = params.get("factor") or max_pos / orig
        attn = params.get("attention_factor")
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if attn is None and mscale and mscale_all:
            # DeepSeek/Mistral style: the YaRN magnitude correction is a ratio of two mscales.
            def m(s: float) -> float:
                return 1.0 if factor <= 1 else 0.1 * s * math.log(factor) + 1.0
            attn = m(mscale) / m(mscale_all)
        rope.yarn_factor, rope.yarn_original_max = float(factor), orig
        rope.yarn_beta_fast = float(params.get("beta_fast") or 32.0)
        rope.yarn_beta_slow = float(params.get("beta_slow") or 1.0)
        rope.yarn_attention_factor = None if attn is None else float(attn)
        rope.yarn_truncate = bool(params.get("truncate", True))
    elif kind != "default":
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported (default or yarn)")
    beta = params.get("llama_4_scaling_beta")
    if beta is not None:
        orig = params.get("llama_4_original_max_position_embeddings", params.get("original_max_position_embeddings"))
        if orig is None:
            raise CheckpointError(f"{where}: llama_4_scaling_beta set without original_max_position_embeddings")
        rope.llama4_beta, rope.llama4_original_max = float(beta), int(orig)
    return rope


def _id_list(x: Any) -> list[int]:
    return [] if x is None else [int(x)] if isinstance(x, int) else [int(i) for i in x]


def config_from_hf(d: dict, where: str) -> ModelConfig:
    """Build a ModelConfig from a parsed config.json (`where` names the file in errors)."""
    text = d.get("text_config") if isinstance(d.get("text_config"), dict) else {}
    types = [t for t in (d.get("model_type"), text.get("model_type")) if t]
    if not any(t in SUPPORTED_TYPES for t in types):
        raise CheckpointError(f"{where}: model_type {types[0] if types else None!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_TYPES)}")
    t = {**d, **text}  # the text config wins where a VLM wrapper nests it
    try:
        max_pos = int(t.get("max_position_embeddings", 2048))
        config = ModelConfig(
            vocab_size=int(t["vocab_size"]), hidden_size=int(t["hidden_size"]),
            intermediate_size=int(t["intermediate_size"]), num_layers=int(t["num_hidden_layers"]),
            num_heads=int(t["num_attention_heads"]),
            num_kv_heads=int(t.get("num_key_value_heads") or t["num_attention_heads"]),
            head_dim=t.get("head_dim"), rms_norm_eps=float(t.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
            rope=_rope_from_hf(t, max_pos, where), bos_token_id=t.get("bos_token_id"),
            eos_token_ids=_id_list(t.get("eos_token_id")), pad_token_id=t.get("pad_token_id"),
            mask_token_id=t.get("mask_token_id"), block_size=int(t.get("block_size", 32)),
            checkpoint_format="nld" if NLD_TYPE in types else "llama")
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from e
    return config


# --- ModelConfig -> config.json ------------------------------------------------------------
def _rope_to_hf(rope: RopeConfig) -> dict:
    p: dict[str, Any] = {"rope_type": "default", "rope_theta": rope.theta}
    if rope.yarn_factor is not None:
        p.update(rope_type="yarn", factor=rope.yarn_factor, original_max_position_embeddings=rope.yarn_original_max,
                 beta_fast=rope.yarn_beta_fast, beta_slow=rope.yarn_beta_slow, truncate=rope.yarn_truncate)
        if rope.yarn_attention_factor is not None:
            p["attention_factor"] = rope.yarn_attention_factor
    if rope.llama4_beta is not None:
        p["llama_4_scaling_beta"] = rope.llama4_beta
        # The two share one key in Ministral-3 configs; keep ours exact when they differ.
        key = "original_max_position_embeddings"
        if p.setdefault(key, rope.llama4_original_max) != rope.llama4_original_max:
            p["llama_4_original_max_position_embeddings"] = rope.llama4_original_max
    return p


def config_to_hf(config: ModelConfig, fmt: str) -> dict:
    """config.json contents for format "llama" (transformers LlamaForCausalLM) or "nld"."""
    eos = config.eos_token_ids
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"] if fmt == "llama" else ["NemotronLabsDiffusionModel"],
        "model_type": "llama" if fmt == "llama" else NLD_TYPE,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "rope_parameters": _rope_to_hf(config.rope),
        "attention_bias": False, "mlp_bias": False, "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (list(eos) or None), "pad_token_id": config.pad_token_id,
        "mask_token_id": config.mask_token_id, "block_size": config.block_size,
    }
    return d


# --- reading a directory -------------------------------------------------------------------
def _read_safetensors(file: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError derives from Exception only
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e


def _weight_files(path: str) -> tuple[list[str], str]:
    """The safetensors files to read, and the file to name when a tensor is missing."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):
        return [single], single
    if not os.path.isfile(index):
        raise CheckpointError(f"{path}: no model.safetensors or {INDEX_FILE} (only safetensors weights are supported)")
    try:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{index}: cannot read the shard index ({e})") from e
    files = [os.path.join(path, s) for s in shards]
    for file in files:
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: shard listed in {INDEX_FILE} does not exist")
    return files, index


def load_hf(path: str | os.PathLike, require_tokenizer: bool = True) -> Checkpoint:
    """Load a local HF-style directory: config.json, safetensors weights, tokenizer files."""
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"{path}: no config.json in {path}")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: cannot parse ({e})") from e
    config = config_from_hf(raw, cfg_file)
    has_tok = os.path.isfile(os.path.join(path, "tokenizer.json"))
    if require_tokenizer and not has_tok:
        raise CheckpointError(f"{path}: no tokenizer.json in {path}")
    tokenizer = Tokenizer.from_dir(path) if has_tok else None

    gen_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_file):  # instruct models often list their chat end token only here
        with open(gen_file, encoding="utf-8") as f:
            extra = _id_list(json.load(f).get("eos_token_id"))
        config.eos_token_ids = list(dict.fromkeys(config.eos_token_ids + extra))
    if tokenizer is not None:
        config.eos_token_ids = config.eos_token_ids or tokenizer.eos_token_ids
        config.bos_token_id = tokenizer.bos_token_id if config.bos_token_id is None else config.bos_token_id

    fmt = config.checkpoint_format
    files, missing_where = _weight_files(path)
    state_dict: dict[str, torch.Tensor] = {}
    origin: dict[str, tuple[str, str]] = {}  # internal name -> (file, stored name), for messages
    for file in files:
        for stored, tensor in _read_safetensors(file).items():
            name = internal_name(stored, fmt)
            if name is None:
                if stored.endswith(_IGNORED_SUFFIXES) or stored.startswith(_IGNORED_PREFIXES):
                    continue
                raise CheckpointError(f"{file}: unexpected tensor {stored} (not part of a {fmt}-format checkpoint)")
            state_dict[name], origin[name] = tensor, (file, stored)
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)  # some tied checkpoints also store a copy of the embedding

    def locate(name: str) -> tuple[str, str]:
        return origin.get(name, (missing_where, stored_name(name, fmt)))
    check_state_dict(config, state_dict, locate)
    return Checkpoint(config=config, state_dict=state_dict, tokenizer=tokenizer, path=path)
