"""Launch settings of `blockdiff serve`, one dataclass (the CLI flags map onto it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    model: str | None = None  # as for LLM(): a directory, a .gguf file, a name in models/, None: default
    served_model_name: str | None = None  # the name clients send as "model" (default: from --model)
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    quantization: str = "none"  # model/quantize.py
    device: str = "cpu"
    cuda_graphs: bool = False  # model/step_graphs.py
    adapter: str | None = None
    # defaults for requests that do not set them
    mode: str = "auto"  # the fastest lossless mode, measured at the current load
    auto_modes: str = "ar,linear_spec,quad_spec"  # what "auto" may choose among
    block_length: int | None = None  # None: each mode's engine default (LLM.block_lengths)
    spec_disable_batch_size: str | int | None = "auto"  # engine/block_lengths.py; None: never
    threshold: float = 0.9
    # admission control
    max_running_requests: int = 32
    max_queue: int = 256
    max_quad_block_length: int = 32  # quad_spec's fused pass costs L*(L+1) tokens: bound it
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    graceful_timeout_s: float = 30.0  # on SIGTERM, in-flight requests get this long to finish
    threads: int | None = None  # torch CPU threads (None: torch's default)

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return "SmolLM2-135M-Instruct"
        return self.model.rstrip("/").split("/")[-1] or self.model
