"""SamplingParams (what a caller asks for) and the one sampler every decoder shares."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from blockdiff.decoding.grammar import StructuredOutputs
from blockdiff.decoding.logprobs import MAX_LOGPROBS

DECODING_MODES = ("ar", "diffusion", "linear_spec", "quad_spec")
# "auto" resolves to the fastest lossless mode when a request is scheduled (engine/auto.py)
MODES = DECODING_MODES + ("auto",)
# block_length when a request leaves it out and the engine has measured nothing better
# (engine/block_lengths.py picks the spec modes' lengths per machine). A spec step costs
# forwards of L (linear_spec) or L*(L+1) (quad_spec) tokens while the drafter's acceptance
# dies after a few slots, so long blocks only add cost (benchmarks/RESULTS.md, "Engine").
# diffusion uses 2: the shipped drafter commits about one token a pass at any block length, so
# a longer block only widens the passes (on an AMX Xeon at batch 16: L2 0.77x ar, L4 0.44x, L8
# 0.32x; at batch 1 L2 0.98x, L4 0.92x), and its text is better the shorter the block
# (perplexity 2.0 at 2, 3.4 at 4, 4.6 at 8; RESULTS.md, sessions 19-20). ar has no blocks; the
# value only groups batches.
DEFAULT_BLOCK_LENGTHS = {"ar": 32, "diffusion": 2, "linear_spec": 8, "quad_spec": 4}


class InvalidParameter(ValueError):
    """A bad sampling parameter; `param` names it (the OpenAI error body's "param")."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidParameter):
    """A prompt, or a prompt and its max_new_tokens, that does not fit the model's context."""


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Refuse token ids outside [0, vocab_size), naming the field they came in."""
    outside = [t for t in ids if not 0 <= t < vocab_size]
    if outside:
        raise InvalidParameter(param, f"token id {outside[0]} is outside the vocabulary [0, {vocab_size})")


@dataclass
class SamplingParams:
    mode: str = "ar"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    block_length: int | None = None  # None: the engine's default for the mode, set when scheduled (LLM.block_lengths)
    threshold: float = 0.9  # diffusion: commit every masked slot at least this confident
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    min_tokens: int = 0  # stop tokens and stop strings do not end a sequence shorter than this
    # log-probabilities (decoding/logprobs.py) of each emitted / prompt token, with this many
    # alternatives; None: not computed. With prompt_logprobs, max_new_tokens may be 0 (scoring only).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputs | None = None  # a grammar the output follows (decoding/grammar.py)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.mode in MODES, "mode", f"unknown mode {self.mode!r}; allowed: {', '.join(MODES)}"),
            (_is_int(self.max_new_tokens) and (self.max_new_tokens > 0 or (self.max_new_tokens == 0 and
                                                                           self.prompt_logprobs is not None)),
             "max_new_tokens", f"max_new_tokens must be a positive integer (0 only to score a prompt, with "
             f"prompt_logprobs), got {self.max_new_tokens!r}"),
            (self.block_length is None or (_is_int(self.block_length) and 0 < self.block_length <= 1024),
             "block_length",
             f"block_length must be an integer in [1, 1024], got {self.block_length!r}"),
            (_is_num(self.threshold) and 0.0 <= self.threshold <= 1.0, "threshold",
             f"threshold must be in [0, 1], got {self.threshold!r}"),
            (_is_num(self.temperature) and self.temperature >= 0, "temperature",
             f"temperature must be >= 0, got {self.temperature!r}"),
            (_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p!r}"),
            (_is_int(self.top_k) and self.top_k >= 0, "top_k", f"top_k must be an integer >= 0, got {self.top_k!r}"),
            (_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings"),
            (_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
             f"min_tokens must be an integer >= 0, got {self.min_tokens!r}"),
        ]
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            checks += [
                (value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name,
                 f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}"),
                (value is None or self.mode != "diffusion", name,
                 f"{name} need the AR model's scores of the emitted tokens, which diffusion does not "
                 f"compute (it commits denoised tokens); use ar, linear_spec, quad_spec or auto"),
            ]
        checks += [
            (self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
             "structured_outputs", "structured_outputs must be a StructuredOutputs"),
            (self.structured_outputs is None or self.mode != "diffusion", "structured_outputs",
             "structured output needs tokens emitted left to right, and diffusion commits a block's "
             "tokens in any order; use ar, linear_spec, quad_spec or auto"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidParameter(param, message)

    @classmethod
    def check_names(cls, kwargs: dict) -> None:
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; allowed: {', '.join(sorted(allowed))}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        cls.check_names(kwargs)
        return cls(**kwargs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) logits -> (..., V) float64 probabilities after temperature, top-k, top-p, min-p."""
    logits = logits.double() / max(params.temperature, 1e-5)
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)
