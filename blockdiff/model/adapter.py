"""PEFT-style LoRA draft adapters: adapter_config.json + adapter_model.safetensors, and
optionally a sampler head (sampler_head.safetensors, format in model/sampler_head.py).

The adapter is attached to the model but used only where a forward passes an
adapter_gate (the draft tokens), and the sampler head only picks draft tokens, so loading
one never changes AR outputs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blockdiff.errors import CheckpointError
from blockdiff.model.sampler_head import SamplerHead
from blockdiff.model.transformer import Transformer

HEAD_FILE, HEAD_KEY = "sampler_head.safetensors", "blockdiff_sampler_head"  # the head's file, its config entry
# base_model.model.model.layers.3.self_attn.o_proj.lora_A.weight (and NLD's encoder.* naming)
_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$")


def load_adapter(model: Transformer, path: str | Path) -> dict:
    """Attach the LoRA in directory `path` to `model`; returns its adapter_config."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (a draft adapter directory needs adapter_config.json "
                                  "and adapter_model.safetensors)")
    try:
        config = json.loads(config_file.read_text())
        rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{config_file}: not a LoRA adapter config ({e})") from None
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_file}: unreadable safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if not match:
            raise CheckpointError(f"{weights_file}: unexpected tensor {key!r}")
        layer, block, proj, ab = match.groups()
        pairs.setdefault(f"layers.{layer}.{block}.{proj}", {})[ab] = tensor
    modules = model.lora_modules()
    for name, ab in pairs.items():
        if name not in modules or set(ab) != {"A", "B"}:
            raise CheckpointError(f"{weights_file}: {name} is not a layer of this model or lacks lora_A/lora_B")
        try:
            modules[name].attach_lora(rank, alpha, ab["A"], ab["B"])
        except ValueError as e:
            raise CheckpointError(f"{weights_file}: {name}: {e}") from None
    if HEAD_KEY in config:
        model.sampler_head = _load_sampler_head(model, path / HEAD_FILE, config[HEAD_KEY])
    return config


def _load_sampler_head(model: Transformer, path: Path, spec: dict) -> SamplerHead:
    try:
        head = SamplerHead(model.config.hidden_size, int(spec["inner_size"]), int(spec["top_k"]),
                           model.config.rms_norm_eps)
        head.load_state_dict(load_file(str(path)), strict=True)
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a sampler head for this model ({type(e).__name__}: {e})") from None
    return head.to(device=model.device, dtype=model.dtype)


def save_adapter(model: Transformer, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, targets, rank, alpha = {}, set(), None, None
    for name, module in model.lora_modules().items():
        if module.lora_A is None:
            continue
        prefix = f"base_model.model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = module.lora_A.detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = module.lora_B.detach().contiguous()
        targets.add(name.rsplit(".", 1)[-1])
        rank = module.lora_A.shape[0]
        alpha = module.lora_scale * rank
    if not tensors:
        raise ValueError("the model has no LoRA adapter attached")
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(targets),
              "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
              "blockdiff_usage": "draft passes only (see SPEC section 2)"}
    head = model.sampler_head
    if head is not None:
        dtype = next(iter(tensors.values())).dtype  # the LoRA's: an export dtype applies to both
        save_file({k: v.detach().to(dtype).contiguous() for k, v in head.state_dict().items()}, str(path / HEAD_FILE))
        config[HEAD_KEY] = {"inner_size": head.inner_size, "top_k": head.top_k}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
