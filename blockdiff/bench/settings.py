"""What a benchmark run measures: BenchSettings (the whole sweep) and RunConfig (one point)."""
from __future__ import annotations

from dataclasses import dataclass, field

from blockdiff import sampling
from blockdiff.sampling import SamplingParams

REFERENCE_MODE = "ar"  # equals-ar and the perplexity ratio are measured against it, so it always runs


@dataclass(frozen=True)
class RunConfig:
    """One configuration: mode x block length x threshold x batch size."""
    mode: str
    block_length: int | None  # None: the engine's default for the mode a request resolves to
    threshold: float
    batch_size: int

    @property
    def label(self) -> str:
        """Short name for tables and plots; only the knobs the mode actually uses."""
        parts = [self.mode]
        if self.mode != REFERENCE_MODE and self.block_length is not None:
            parts.append(f"L{self.block_length}")
        if self.mode == "diffusion":
            parts.append(f"t{self.threshold:g}")
        if self.batch_size != 1:
            parts.append(f"bs{self.batch_size}")
        return " ".join(parts)


@dataclass
class BenchSettings:
    model: str | None = None
    adapter: str | None = None
    dtype: str = "auto"
    quantization: str = "none"
    device: str = "cpu"
    cuda_graphs: bool = False
    prompt_set: str = "chat"
    num_prompts: int | None = None
    modes: list[str] = field(default_factory=lambda: list(sampling.MODES))
    block_lengths: list[int] | None = None  # None: each mode's default on the loaded engine (LLM.block_lengths)
    spec_disable_batch_size: str | int | None = "auto"  # as LLM's
    quad_block_lengths: list[int] | None = None  # None: block_lengths
    thresholds: list[float] = field(default_factory=lambda: [0.9])
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    repeats: int = 1
    hf_baselines: bool = True
    llama_cpp: bool = True  # llama.cpp on the same GGUF, when llama-cpp-python is installed
    prompt_lookup_tokens: int = 10

    def run_configs(self, default_block_lengths: dict[str, int] = sampling.DEFAULT_BLOCK_LENGTHS) -> list[RunConfig]:
        """Every configuration, ar first at each batch size (the others are compared with it).
        A mode without block lengths given runs at its default (pass the engine's)."""
        modes = [REFERENCE_MODE] + [m for m in dict.fromkeys(self.modes) if m != REFERENCE_MODE]
        configs = []
        for batch in self.batch_sizes:
            for mode in modes:
                blocks = (self.quad_block_lengths or self.block_lengths) if mode == "quad_spec" else self.block_lengths
                blocks = blocks or [default_block_lengths.get(mode)]  # auto: None, its chosen mode's
                if mode == REFERENCE_MODE:
                    blocks = blocks[:1]  # ar ignores the block length: one run is enough
                thresholds = self.thresholds if mode == "diffusion" else self.thresholds[:1]
                configs += [RunConfig(mode, b, t, batch) for b in blocks for t in thresholds]
        return configs

    def params(self, config: RunConfig) -> SamplingParams:
        return SamplingParams(mode=config.mode, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              block_length=config.block_length, threshold=config.threshold, seed=self.seed)

    def validate(self) -> None:
        """Fail on bad values before the model loads (ValueError: the CLI prints one line)."""
        # read MODES at call time: modes added later (e.g. "auto") are accepted without changes here
        unknown = [m for m in self.modes if m not in sampling.MODES]
        if unknown:
            raise ValueError(f"unknown mode(s) {', '.join(unknown)}; allowed: {', '.join(sampling.MODES)}")
        for name, values in (("thresholds", self.thresholds), ("batch sizes", self.batch_sizes)):
            if not values:
                raise ValueError(f"no {name} given")
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.prompt_lookup_tokens < 1:
            raise ValueError(f"prompt lookup tokens must be >= 1, got {self.prompt_lookup_tokens}")
        for config in self.run_configs():
            self.params(config)  # SamplingParams names the bad parameter
