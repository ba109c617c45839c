"""Model configuration: one dataclass, read from HF/NLD config.json or GGUF metadata."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class RopeConfig:
    theta: float = 10000.0
    # YaRN context extension; None means plain RoPE.
    yarn_factor: float | None = None
    yarn_original_max: int | None = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attention_factor: float | None = None  # None: derived from the factor, as YaRN does
    yarn_truncate: bool = True
    # Llama-4 query scaling: q *= 1 + beta * log(1 + floor(pos / original_max)).
    llama4_beta: float | None = None
    llama4_original_max: int | None = None


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    # Diffusion: the token written into not-yet-decoded slots, and the trained block size.
    mask_token_id: int | None = None
    block_size: int = 32
    # "llama" (model.* / lm_head) or "nld" (encoder.* / diffusion_head): how it is saved.
    checkpoint_format: str = "llama"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if isinstance(self.rope, dict):
            self.rope = RopeConfig(**self.rope)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config: num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
