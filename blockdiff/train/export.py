"""The artifact a finished run leaves in RUN/final: what `LLM(...)` and `--adapter` load.

target full -> an HF ("llama") or NLD checkpoint directory with tokenizer and config.json
(mask_token_id and block_size included); target lora -> a PEFT adapter directory.
"""
from __future__ import annotations

import os
import shutil

import torch

from blockdiff.model.adapter import save_adapter
from blockdiff.model.checkpoint import save_checkpoint
from blockdiff.model.transformer import Transformer
from blockdiff.train import distributed as D
from blockdiff.train import run_state

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_final(cfg, objective, setup, names: list[str], sharded: bool, d: D.Dist) -> str:
    out = os.path.join(cfg.run.out_dir, "final")
    weights = run_state.get_weights(objective, names, sharded)  # collective under FSDP
    if not d.main:
        return out
    dtype = EXPORT_DTYPES[cfg.run.export_dtype]
    if cfg.target == "lora":
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _save_lora(setup.model, weights, tmp, dtype)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
        return out
    state = {n: t.to(dtype) for n, t in weights.items()}
    config = setup.model.config
    save_checkpoint((config, state, setup.tokenizer), out, format=cfg.run.export_format)
    return out


def _save_lora(model: Transformer, weights: dict[str, torch.Tensor], path: str, dtype: torch.dtype) -> None:
    """Write the adapter from gathered `weights` (names like layers.0.self_attn.o_proj.lora_A,
    sampler_head.down.weight)."""
    saved = {}
    with torch.no_grad():
        for name, t in weights.items():
            module_name, attr = name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            saved[(module, attr)] = getattr(module, attr).data
            setattr(module, attr, torch.nn.Parameter(t.to(dtype), requires_grad=False))
    try:
        save_adapter(model, path)
    finally:
        for (module, attr), data in saved.items():
            setattr(module, attr, torch.nn.Parameter(data))
