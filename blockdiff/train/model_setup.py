"""The model a run trains: built from an architecture + tokenizer, or loaded from a checkpoint;
then either all weights train, or the base is frozen and a draft LoRA trains."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from blockdiff.config import ModelConfig
from blockdiff.model.adapter import load_adapter
from blockdiff.model.checkpoint import load_checkpoint
from blockdiff.model.dtype import native_bf16
from blockdiff.model.registry import SMOLLM2_MASK_TOKEN_ID, resolve_model, smollm2_gguf_path
from blockdiff.model.sampler_head import SamplerHead
from blockdiff.model.transformer import Transformer
from blockdiff.tokenizer import Tokenizer
from blockdiff.train.config import TrainConfig
from blockdiff.train.tokenizer_train import special_ids


def autocast_dtype(run) -> torch.dtype | None:
    """The autocast dtype of the forward for `run.dtype`, None for fp32 (no autocast). "auto" is
    bf16 where `run.device` multiplies it natively and fp32 elsewhere (see blockdiff.model.dtype)."""
    name = run.dtype
    if name == "auto":
        name = "bf16" if native_bf16(run.device) else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


@dataclass
class Setup:
    model: Transformer
    tokenizer: Tokenizer
    trainable: dict[str, nn.Parameter]  # name in model.state_dict() -> parameter


def scratch_config(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    ids = special_ids(tokenizer)
    fields = dict(cfg.model)
    # Round the vocabulary up to a multiple of 64 (faster matmuls); the extra rows are never targets.
    fields.setdefault("vocab_size", -(-tokenizer.vocab_size // 64) * 64)
    fields.setdefault("mask_token_id", cfg.mask_token_id if cfg.mask_token_id is not None else ids["mask"])
    fields.setdefault("eos_token_ids", list(ids["eos"]))
    fields.setdefault("pad_token_id", ids["pad"])
    fields.setdefault("block_size", cfg.objective.block_size)
    fields.setdefault("max_position_embeddings", max(2048, cfg.data.seq_len))
    config = ModelConfig(**fields)
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size {config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return config


def init_weights(model: Transformer) -> None:
    """GPT-2 style: N(0, 0.02), and residual-stream outputs scaled by 1/sqrt(2 * layers) so the
    residual variance does not grow with depth."""
    std = 0.02
    out_std = std / math.sqrt(2 * model.config.num_layers)
    for name, p in model.named_parameters():
        if "norm" in name:
            continue
        nn.init.normal_(p, std=out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std)


def resolve_base(name: str) -> tuple[str, int | None]:
    """base_model "default" (or "smollm2") is the embedded SmolLM2-135M-Instruct GGUF, with its
    reserved mask token; a name in models/ or a path otherwise. -> (path, default mask id)."""
    if name in ("default", "smollm2"):
        return str(smollm2_gguf_path()), SMOLLM2_MASK_TOKEN_ID
    source = resolve_model(name)
    return source.path, source.mask_token_id


def build(cfg: TrainConfig) -> Setup:
    torch.manual_seed(cfg.run.seed)  # same seed, same initial weights and adapter
    if cfg.base_model:
        path, default_mask = resolve_base(cfg.base_model)
        ckpt = load_checkpoint(path)
        config, tokenizer = ckpt.config, ckpt.tokenizer
        if cfg.mask_token_id is not None:
            config.mask_token_id = cfg.mask_token_id
        elif config.mask_token_id is None:
            config.mask_token_id = default_mask
        if config.mask_token_id is None:
            raise ValueError(f"{cfg.base_model}: the model has no mask token; set mask_token_id to a reserved "
                             "token id (SmolLM2: blockdiff.model.registry.SMOLLM2_MASK_TOKEN_ID)")
        config.block_size = cfg.objective.block_size
        model = Transformer(config)
        model.load_state_dict(ckpt.state_dict, strict=True)
    else:
        tokenizer = Tokenizer.from_dir(cfg.tokenizer)
        model = Transformer(scratch_config(cfg, tokenizer))
        init_weights(model)
    model.float()  # fp32 master weights; autocast gives the bf16 speed
    if cfg.target == "full":
        return Setup(model, tokenizer, dict(model.named_parameters()))
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.lora.init:
        load_adapter(model, cfg.lora.init)  # fp32 copies: attach_lora casts to the model's dtype
    else:
        attached = 0
        for name, module in model.lora_modules().items():
            if name.rsplit(".", 1)[-1] in cfg.lora.targets:
                module.attach_lora(cfg.lora.r, cfg.lora.alpha)
                attached += 1
        if not attached:
            raise ValueError(f"lora.targets {cfg.lora.targets} match no layer (try o_proj, q_proj, ..., down_proj)")
    if cfg.lora.sampler_head_inner and model.sampler_head is None:
        model.sampler_head = SamplerHead(model.config.hidden_size, cfg.lora.sampler_head_inner,
                                         cfg.lora.sampler_head_top_k, model.config.rms_norm_eps)
    trainable = {n: p for n, p in model.named_parameters()
                 if (".lora_" in n and cfg.lora.train_adapter) or n.startswith("sampler_head.")}
    if not trainable:
        raise ValueError(f"{cfg.lora.init}: has no sampler head to train (lora.train_adapter is false)")
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    low = autocast_dtype(cfg.run)
    if low is not None:  # a frozen base needs no fp32 master copy: half the memory traffic
        for name, p in model.named_parameters():
            if name not in trainable:
                p.data = p.data.to(low)
    return Setup(model, tokenizer, trainable)


def count_params(params) -> int:
    return sum(p.numel() for p in params)
