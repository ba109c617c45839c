"""Structured output: a grammar every emitted token must follow (llguidance, as vLLM and SGLang use).

A request's `StructuredOutputs` (a JSON schema, any JSON object, a regex, a choice of strings
or a Lark / GBNF grammar) compiles to one llguidance grammar, and each of its sequences gets a
`Grammar`: a matcher that follows the sequence's emitted tokens. Decoders constrain the
logits that pick tokens:
- every pick of one next token (ar, and each mode's first token) takes the current mask;
- the spec modes verify through `path_masks`: the mask of slot i is the grammar's state after
  drafts 0..i-1. A draft the grammar forbids has probability 0 under its masked target, so
  verification rejects it, and the accepted drafts and the bonus token are what ar would emit
  under the same grammar (greedy), or follow the masked AR distribution (sampling).
- greedy drafts are repaired (`repair`): a draft the grammar forbids becomes the draft pass's
  best allowed token, so drafts are not wasted on what verification must reject. This only
  changes proposals; what is emitted is decided as above.
Log-probabilities stay the raw model's (vLLM's default, "raw_logprobs"). A sequence ends
("stop") when its grammar is complete and nothing may follow it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import llguidance
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark

if TYPE_CHECKING:
    from blockdiff.tokenizer import Tokenizer

# JSON as json.dumps writes it (", " and ": "), the spacing small models were trained on;
# flexible whitespace lets a model pad with newlines until it runs out of tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A structured-output request that cannot be compiled; `field` names the bad part."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class StructuredOutputs:
    """What the output must be (vLLM's StructuredOutputsParams); exactly one field is set."""
    json: dict | str | None = None  # a JSON schema (a dict, or its JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None  # exactly one of these strings
    grammar: str | None = None  # Lark (llguidance's dialect), or GBNF (llama.cpp's) when it has "::="

    def __post_init__(self):
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise GrammarError(given[1] if given else "json",
                               f"structured output needs exactly one of json, json_object, regex, choice, "
                               f"grammar; got {given or 'none'}")
        self.kind = given[0]
        self.compiled = _compile(self.kind, getattr(self, self.kind))
        error = llguidance.LLMatcher.validate_grammar(self.compiled)
        if error and not error.startswith("WARNING"):
            raise GrammarError(self.kind, f"invalid {self.kind}: {error.strip()}")


def _compile(kind: str, value: Any) -> str:
    """One field of StructuredOutputs -> an llguidance grammar (JSON text)."""
    if kind == "json_object":
        value = {"type": "object"}
    if kind in ("json", "json_object"):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise GrammarError(kind, f"json must be a JSON schema: {e}") from None
        if not isinstance(value, dict):
            raise GrammarError(kind, f"json must be a JSON schema object, got {type(value).__name__}")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(kind, f"invalid json schema: {e}") from None
    if kind == "regex":
        if not isinstance(value, str):
            raise GrammarError(kind, f"regex must be a string, got {type(value).__name__}")
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise GrammarError(kind, "choice must be a non-empty list of non-empty strings")
        # Lark string literals take JSON's escapes
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in value)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    if not isinstance(value, str) or not value.strip():
        raise GrammarError(kind, "grammar must be a non-empty Lark or GBNF grammar")
    try:
        lark = gbnf_to_lark(value) if "::=" in value else value
    except Exception as e:  # the converter's own parse errors
        raise GrammarError(kind, f"invalid GBNF grammar: {e}") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


class GrammarCompiler:
    """Makes each sequence's Grammar for one tokenizer and a model's vocabulary of
    `vocab_size` logits; the tokenizer's llguidance form is built on first use (about 0.4 s
    for a 49k vocabulary) and then shared."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None

    def grammar(self, spec: StructuredOutputs) -> "Grammar":
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(self.tokenizer.tok.to_str(), n_vocab=self.vocab_size,
                                                     eos_token=self.tokenizer.eos_token_ids)
        matcher = llguidance.LLMatcher(self._tokenizer, spec.compiled, log_level=0)
        if matcher.is_error():
            raise GrammarError(spec.kind, f"invalid {spec.kind}: {matcher.get_error().strip()}")
        return Grammar(matcher, self.vocab_size)


class Grammar:
    """One sequence's matcher: `consume` each emitted token; masks are (V,) bool, True = allowed."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self._bits = torch.arange(32, dtype=torch.int32)

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and nothing may follow (only EOS would)."""
        return self.matcher.is_stopped()

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} broke the grammar it was masked by: {self.matcher.get_error()}")

    def allowed(self) -> torch.Tensor:
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)  # (>= V/32,)
        bits = (words[:, None] >> self._bits) & 1  # (words, 32): bit j of word w is token 32w + j
        return bits.reshape(-1)[:self.vocab_size].bool()  # (V,)

    def repair(self, drafts: list[int], logits: torch.Tensor) -> list[int]:
        """Greedy drafts (K,) with their (K, V) draft logits -> drafts the grammar allows: each
        forbidden one is replaced by the best allowed token of its slot, and the walk goes on
        from it. Stops changing drafts where the grammar is complete. The matcher ends where
        it started."""
        repaired, walked = list(drafts), 0
        for i, token in enumerate(drafts):
            if self.complete:
                break
            allowed = self.allowed()
            if not allowed[token]:
                repaired[i] = token = int(logits[i].masked_fill(~allowed.to(logits.device), float("-inf")).argmax())
            self.consume(token)
            walked += 1
        if walked:
            self.matcher.rollback(walked)
        return repaired

    def path_masks(self, drafts: list[int]) -> torch.Tensor:
        """(K+1, V) masks along K drafts: row i is the mask after drafts[:i]. From the first
        draft the grammar forbids (or the point where it is complete) the rows repeat the
        mask there: verification stops at that slot. The matcher ends where it started."""
        masks = [self.allowed()]
        for token in drafts:
            if self.complete or not masks[-1][token]:
                break
            self.consume(token)
            masks.append(self.allowed())
        walked = len(masks) - 1
        if walked:
            self.matcher.rollback(walked)
        masks += [masks[-1]] * (len(drafts) + 1 - len(masks))
        return torch.stack(masks)  # (K+1, V)
