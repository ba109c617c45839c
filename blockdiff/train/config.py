"""Training configuration: nested dataclasses read from YAML (or TOML), with CLI overrides.

Overrides name a field by its dotted path (`--optim.lr 3e-4`, `--model.hidden_size 256`) or,
where the leaf name is unique across sections, by the leaf alone (`--lr 3e-4`). Values are
parsed as YAML scalars/lists, so `--data.paths "[a, b]"` and `--run.dtype fp32` both work.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from blockdiff.train.objective import ObjectiveConfig


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # files, directories or .jsonl files
    extensions: list[str] = field(default_factory=lambda: [".py", ".txt", ".md", ".rst", ".jsonl"])
    exclude_dirs: list[str] = field(default_factory=lambda: ["__pycache__", ".git"])
    seq_len: int = 256
    val_fraction: float = 0.0  # documents held out (by a hash of their name) for validation
    max_tokens: int | None = None  # stop reading once this many tokens are in (smoke runs)
    pad_to_block: int = 0  # > 0: pad each document with learned EOS to a multiple of this (the block size)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # warmup-stable-decay: the last 20% of steps decay to min_lr
    max_steps: int = 1000
    micro_batch: int = 8  # sequences per process per forward
    grad_accum: int = 1  # global batch = micro_batch * grad_accum * world size


@dataclass
class LoraConfig:
    r: int = 32
    alpha: float = 64.0
    targets: list[str] = field(default_factory=lambda: ["o_proj"])
    init: str | None = None  # a PEFT adapter directory to start from (its r, alpha and targets win)
    # > 0: train a sampler head (model/sampler_head.py) of this inner width with the adapter; one
    # in `init` is kept (and trained) whatever this says
    sampler_head_inner: int = 0
    sampler_head_top_k: int = 8  # candidates per slot the head chooses among at draft time
    # false: the adapter stays as `init` left it and only the sampler head trains (no backward
    # through the model: a stage at about half the cost of a step)
    train_adapter: bool = True


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    dtype: str = "auto"  # autocast dtype of forward/backward (auto: bf16 where native, else fp32); weights and optimizer stay fp32
    device: str = "cpu"  # "cuda" under torchrun takes cuda:LOCAL_RANK
    parallel: str = "ddp"  # with several processes: "ddp" or "fsdp" (shards weights and optimizer)
    save_every: int = 200
    keep_last: int = 3
    log_every: int = 1
    eval_every: int = 0  # 0: never (needs data.val_fraction > 0)
    eval_batches: int = 8
    threads: int | None = None  # torch CPU threads per process (None: torch's default)
    progress: bool = True
    export_dtype: str = "fp32"  # dtype of RUN/final: fp32, bf16 (half the size) or fp16
    export_format: str = "llama"  # RUN/final for target full: "llama" (HF names) or "nld"
    throttle_s: float = 0.0  # sleep per step: lets a shared machine breathe, and tests kill mid-run
    # stop after the step that crosses this many minutes of this process's training, saving a
    # checkpoint and exporting final/ as at max_steps (Megatron's --exit-duration-in-mins): for
    # leases with a hard end, such as a lent GPU. The schedule still runs to max_steps.
    max_minutes: float | None = None


@dataclass
class TrainConfig:
    model: dict | None = None  # ModelConfig fields, for training from scratch
    base_model: str | None = None  # a pretrained HF/NLD dir or .gguf to continue (convert)
    tokenizer: str | None = None  # tokenizer directory for from-scratch runs
    mask_token_id: int | None = None  # overrides the model's (SmolLM2 has none of its own)
    target: str = "full"  # "full" weights or a draft "lora" adapter (base frozen)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "TrainConfig":
        if self.target not in ("full", "lora"):
            raise ValueError(f"target must be 'full' or 'lora', got {self.target!r}")
        if (self.model is None) == (self.base_model is None):
            raise ValueError("give exactly one of `model` (architecture, from scratch) and `base_model` (a checkpoint)")
        if self.model is not None and not self.tokenizer:
            raise ValueError("training from scratch needs `tokenizer` (see `blockdiff tokenizer train`)")
        if self.target == "lora" and self.objective.kind != "joint":
            raise ValueError("a draft LoRA only learns from the diffusion loss: use objective.kind joint")
        if self.run.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"run.dtype must be auto, bf16, fp16 or fp32, got {self.run.dtype!r}")
        if self.run.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"run.parallel must be ddp or fsdp, got {self.run.parallel!r}")
        if not self.data.paths:
            raise ValueError("data.paths is empty: give files, directories or JSONL to train on")
        if not self.lora.train_adapter and not (self.lora.sampler_head_inner or self.lora.init):
            raise ValueError("lora.train_adapter false trains only a sampler head: set lora.sampler_head_inner "
                             "or start from an adapter that has one (lora.init)")
        pad = self.data.pad_to_block
        if pad < 0 or (pad and self.data.seq_len % pad):
            raise ValueError(f"data.pad_to_block must be 0 or divide data.seq_len ({self.data.seq_len}), got {pad}: "
                             "documents padded to blocks stay aligned only if sequences are cut on block boundaries")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        sub = _SECTIONS.get(name) if cls is TrainConfig else None
        kwargs[name] = _build(sub, value or {}, f"{where}.{name}") if sub else _coerce(known[name].type, value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(annotation: Any, value: Any, where: str) -> Any:
    """YAML reads `3e-4` (no dot) as a string: convert strings by the field's declared type."""
    if not isinstance(value, str):
        return value
    kinds = [k.strip() for k in str(annotation).split("|")]
    if "None" in kinds and value.lower() in ("none", "null", "~"):
        return None
    try:
        if kinds[0] == "float":
            return float(value)
        if kinds[0] == "int":
            return int(value)
    except ValueError:
        raise ValueError(f"{where}: expected {kinds[0]}, got {value!r}") from None
    return value


_SECTIONS = {"data": DataConfig, "objective": ObjectiveConfig, "optim": OptimConfig,
             "lora": LoraConfig, "run": RunConfig}


def leaf_paths() -> dict[str, str]:
    """Every overridable dotted path, plus unique leaf aliases: alias -> dotted path."""
    from blockdiff.config import ModelConfig
    paths = [f.name for f in fields(TrainConfig) if f.name not in _SECTIONS and f.name != "model"]
    for section, cls in _SECTIONS.items():
        paths += [f"{section}.{f.name}" for f in fields(cls)]
    paths += [f"model.{f.name}" for f in fields(ModelConfig) if f.name != "rope"]
    out = {p: p for p in paths}
    leaves: dict[str, list[str]] = {}
    for p in paths:
        if "." in p and not p.startswith("model."):
            leaves.setdefault(p.split(".")[-1], []).append(p)
    for leaf, ps in leaves.items():
        if len(ps) == 1 and leaf not in out:
            out[leaf] = ps[0]
    return out


def apply_override(raw: dict, dotted: str, text: str) -> None:
    value = yaml.safe_load(text) if text != "" else ""
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise ValueError(f"--{dotted}: {key} is not a section")
    node[leaf] = value


def read_config_file(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".toml"):
        import tomllib
        raw = tomllib.loads(data.decode())
    elif path.endswith(".json"):
        raw = json.loads(data)
    else:
        raw = yaml.safe_load(data) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a training config must be a mapping")
    return raw


def load_config(path: str | os.PathLike | None, overrides: dict[str, str] | None = None) -> TrainConfig:
    """Read the file (if any), apply {dotted path: text} overrides, build and validate."""
    raw = read_config_file(path) if path else {}
    aliases = leaf_paths()
    for name, text in (overrides or {}).items():
        apply_override(raw, aliases.get(name, name), text)
    return _build(TrainConfig, raw, os.fspath(path) if path else "config").validate()


def config_from_dict(d: dict) -> TrainConfig:
    return _build(TrainConfig, d, "saved config")


def describe(cfg: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
