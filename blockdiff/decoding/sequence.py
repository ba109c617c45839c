"""One request's decoding state: its tokens, how it ends, and its metrics."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from blockdiff.decoding.grammar import Grammar
from blockdiff.decoding.logprobs import TokenLogprob
from blockdiff.decoding.metrics import Metrics
from blockdiff.sampling import SamplingParams


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int] = frozenset()
    detokenize: Callable[[list[int]], str] | None = None  # needed only for stop strings
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length"
    stop_text_end: int | None = None  # where a stop string cut the text
    pending: int | None = None  # the last emitted token, whose keys/values are not cached yet
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token (params.logprobs)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, the first None
    grammar: Grammar | None = None  # params.structured_outputs' matcher, following output_ids
    suffix_ids: list[int] | None = None  # fill-in-the-middle: the tokens after the gap (decoding/infill.py)
    metrics: Metrics = field(default_factory=Metrics)
    arrival: float = field(default_factory=time.perf_counter)  # the request's clock: ttft_s and wall_s count from here

    def __post_init__(self):
        self.metrics.prompt_tokens = len(self.prompt_ids)
        self.generator = None
        if not self.params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.params.seed if self.params.seed is not None else
                                       int(torch.randint(0, 2**62, (1,))))
        self.stop_ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            self.stop_ids |= set(self.eos_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.output_ids)

    def may_stop(self, length: int) -> bool:
        """min_tokens (vLLM's field): before `length` reaches it, stop tokens are kept as ordinary
        tokens and stop strings are not searched for; only max_new_tokens ends the sequence."""
        return length >= self.params.min_tokens

    def append(self, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> int:
        """Emit tokens in order until one ends the sequence; returns how many were kept.
        `logprobs` (one per token) is required when params.logprobs is set."""
        if self.params.logprobs is not None and (logprobs is None or len(logprobs) != len(tokens)):
            raise ValueError("this sequence records logprobs: append needs one per token")
        kept = 0
        for token in tokens:
            if self.finished:
                break
            if not self.output_ids:
                self.metrics.ttft_s = time.perf_counter() - self.arrival
            self.output_ids.append(token)
            kept += 1
            if self.grammar is not None:
                self.grammar.consume(token)
            if (token in self.stop_ids and self.may_stop(len(self.output_ids))) or (
                    self.grammar is not None and self.grammar.complete):
                self.finish_reason = "stop"
            elif self.remaining <= 0:
                self.finish_reason = "length"
        if logprobs is not None:
            self.logprobs.extend(logprobs[:kept])
        if kept and self.params.stop and self.may_stop(len(self.output_ids)):
            self._check_stop_strings(kept)
        self._settle()
        return kept

    def finish_empty(self) -> None:
        """End a sequence that emits nothing (max_new_tokens 0: it only scores its prompt)."""
        self.finish_reason = "length"
        self._settle()

    def _settle(self) -> None:
        self.metrics.generated_tokens = len(self.output_ids)
        if self.finished:
            self.metrics.wall_s = time.perf_counter() - self.arrival
        self.pending = self.output_ids[-1] if self.output_ids else None

    def completes_stop_string(self, tokens: list[int]) -> bool:
        """Whether appending `tokens` would complete a stop string: diffusion ends a block as
        soon as the text up to its first MASK holds one, instead of denoising the slots after it."""
        ids = self.output_ids + tokens
        return bool(tokens and self.params.stop and self.may_stop(len(ids))
                    and self._find_stop_string(ids, len(tokens)) is not None)

    def _find_stop_string(self, ids: list[int], new: int) -> int | None:
        """Where the first stop string starts in the text of `ids`, searching only the text that
        the last `new` tokens could have completed; None if there is none."""
        text = self.detokenize(ids)
        longest = max(len(s) for s in self.params.stop)
        start = max(0, len(self.detokenize(ids[:-new])) - longest) if new < len(ids) else 0
        hits = [i for s in self.params.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _check_stop_strings(self, new: int) -> None:
        """Cut at the first stop string, even when a block overshot it; no text past it survives."""
        cut = self._find_stop_string(self.output_ids, new)
        if cut is None:
            return
        text = self.detokenize(self.output_ids)
        # keep the fewest tokens whose text covers everything before the stop string (whole
        # characters: a prefix ending inside a multi-byte character decodes to U+FFFD)
        kept_text = text[:cut]
        keep = next(k for k in range(len(self.output_ids) + 1)
                    if self.detokenize(self.output_ids[:k]).startswith(kept_text))
        del self.output_ids[keep:]
        del self.logprobs[keep:]
        self.stop_text_end = cut
        self.finish_reason = "stop"
