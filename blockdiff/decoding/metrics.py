"""Decoding metrics, defined once (SPEC section 6)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Metrics:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    nfe: int = 0  # decode forwards this sequence needed (prefill counted apart)
    prefill_nfe: int = 0
    steps: int = 0  # ar: tokens; diffusion: blocks; spec modes: draft+verify cycles
    verify_steps: int = 0
    committed_in_verify: int = 0  # tokens committed by verify steps, bonus included
    drafted_tokens: int = 0
    accepted_tokens: int = 0  # draft tokens the verifier confirmed
    accepted_by_position: list[int] = field(default_factory=list)  # index i: drafts i+1 accepted
    drafted_by_position: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    wall_s: float = 0.0

    @property
    def tpf(self) -> float:
        """Generated tokens per decode forward."""
        return self.generated_tokens / self.nfe if self.nfe else float(self.generated_tokens)

    @property
    def tokens_per_step(self) -> float:
        return self.generated_tokens / self.steps if self.steps else float(self.generated_tokens)

    @property
    def acceptance(self) -> float | None:
        """Mean tokens committed per verification step (bonus included); None outside spec modes."""
        return self.committed_in_verify / self.verify_steps if self.verify_steps else None

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def record_draft(self, drafted: int, accepted: int) -> None:
        """One verify step saw `drafted` draft tokens and confirmed the first `accepted`."""
        for store in (self.drafted_by_position, self.accepted_by_position):
            if len(store) < drafted:
                store.extend([0] * (drafted - len(store)))
        for i in range(drafted):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += i < accepted
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
            "nfe": self.nfe, "prefill_nfe": self.prefill_nfe, "tpf": self.tpf, "steps": self.steps,
            "tokens_per_step": self.tokens_per_step, "acceptance": self.acceptance,
            "drafted_tokens": self.drafted_tokens, "accepted_tokens": self.accepted_tokens,
            "accepted_by_position": self.accepted_by_position, "drafted_by_position": self.drafted_by_position,
            "ttft_s": self.ttft_s, "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s,
        }
