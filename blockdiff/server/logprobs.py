"""The `logprobs` objects of the OpenAI API, from the engine's TokenLogprob records.

Completions (the legacy shape vLLM serves, which lm-evaluation-harness reads):
    {"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} | None],
     "text_offset": [int]}
with `echo` the prompt's tokens first (the very first has no logprob: None). As in vLLM, each
top_logprobs dict holds the `logprobs` most likely tokens and the chosen one; where two of
them read the same (pieces of a character), the key holds the likelier.
Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.

A stream carries, in each chunk, the records of the tokens whose text that chunk completes
(`StreamedLogprobs`); a token whose text is still held back (a partial character, a possible
stop string) waits for the chunk that sends it, and the finish chunk sends the rest.
"""
from __future__ import annotations

from collections.abc import Callable

from blockdiff.decoding.logprobs import TokenLogprob
from blockdiff.tokenizer import Tokenizer


class LogprobFormatter:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.detokenize = tokenizer.decode

    def token_text(self, token: int) -> str:
        """One token's text, special tokens included (part of a character reads U+FFFD)."""
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def completion(self, ids: list[int], records: list[TokenLogprob | None], base_offset: int = 0,
                   offset_ids: list[int] | None = None) -> dict:
        """The completions object for `ids` (one record each). text_offset[i] is base_offset
        plus the length of the text of `offset_ids` (default: `ids`) before token i."""
        offset_ids = ids if offset_ids is None else offset_ids
        start = len(offset_ids) - len(ids)
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, (token, record) in enumerate(zip(ids, records)):
            out["tokens"].append(self.token_text(token))
            out["text_offset"].append(base_offset + len(self.detokenize(offset_ids[:start + i])))
            if record is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(record.logprob)
            top: dict[str, float] = {}
            for t, lp in record.top + ((token, record.logprob),):
                top.setdefault(self.token_text(t), lp)  # tokens with the same text keep the likeliest
            out["top_logprobs"].append(top)
        return out

    def chat(self, records: list[TokenLogprob]) -> dict:
        return {"content": [{**self._entry(r.token_id, r.logprob),
                             "top_logprobs": [self._entry(t, lp) for t, lp in r.top]} for r in records]}

    def _entry(self, token: int, logprob: float) -> dict:
        return {"token": self.token_text(token), "logprob": logprob,
                "bytes": list(self.tokenizer.token_bytes(token))}


class StreamedLogprobs:
    """Which output tokens' records a stream has sent: those whose whole text it has sent."""

    def __init__(self, detokenize: Callable[[list[int]], str]):
        self.detokenize = detokenize
        self.sent = 0  # tokens

    def take(self, ids: list[int], sent_chars: int, final: bool) -> range:
        """Indices of the tokens to report now, given that `sent_chars` characters of the text
        have been sent; at the end (`final`) every remaining token."""
        if final:
            covered = len(ids)
        else:
            covered = self.sent
            for j in range(self.sent + 1, len(ids) + 1):
                text = self.detokenize(ids[:j])
                if len(text) <= sent_chars and not text.endswith("\ufffd"):
                    covered = j
        taken = range(self.sent, covered)
        self.sent = max(self.sent, covered)
        return taken
