"""Errors raised when a checkpoint on disk cannot be used."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (or its tokenizer) is missing, corrupt or of an unsupported kind.

    By convention the message starts with the file or directory concerned, then the problem:
    "model.safetensors: tensor model.layers.3.self_attn.q_proj.weight has shape [64, 32], expected [64, 64]".
    """
