"""The state the four decoders share: a model, a KV cache with one row per live sequence,
and the sampling, forward and retirement helpers every mode uses."""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from blockdiff.decoding.logprobs import score
from blockdiff.decoding.sampler import Picks, pick
from blockdiff.decoding.sequence import Sequence
from blockdiff.model.attention_mask import Pattern
from blockdiff.model.kv_cache import KVCache, compacting_order
from blockdiff.model.transformer import Transformer

# The decoders' step events, for playgrounds and streams. Every payload is about one row:
# payload["row"] is valid when the event is emitted (batch.seqs[row] is its Sequence, which the
# observer is also handed); rows move later, when sequences retire or batches merge. Kinds:
#   "denoise" (diffusion, one bidirectional pass): step, block (L ids, slot 0 the committed
#             seed), masked (L bools), end (slots 1..end-1 are this block's output)
#   "draft"   (linear_spec, quad_spec): drafts (the L-1 ids proposed after the pending token)
#   "verify"  (spec modes): drafts, accepted, drafted, bonus (the AR token after the accepted ones)
#   "commit"  (every mode): tokens (ids just appended to the output)
# and every payload also has nfe and completion_tokens, the row's running counts.
EventHook = Callable[[str, dict], None]

# The widest prefill pass: longer prompts are cached PREFILL_CHUNK tokens at a time
# (`DecodeBatch.cache_prompts`), which bounds a pass's attention scores by the span.
PREFILL_CHUNK = 128
# prompt logprobs are scored this many slots at a time: a long prompt's (P-1, V) float32
# logits would take hundreds of MB at once
PROMPT_SCORE_ROWS = 128


class StepObserver(Protocol):
    """Who hears a batch's step events. Decoders build a row's payload only when `wants` says so."""

    def wants(self, seq: Sequence) -> bool: ...

    def event(self, kind: str, seq: Sequence, payload: dict) -> None: ...


class DecodeBatch:
    def __init__(self, model: Transformer, seqs: list[Sequence], extra_slots: int,
                 observer: StepObserver | None = None):
        self.model = model
        self.seqs = list(seqs)
        self.block_length = seqs[0].params.block_length
        capacity = max(len(s.prompt_ids) + s.params.max_new_tokens for s in seqs) + extra_slots
        self.cache = KVCache(model.config, len(seqs), capacity, model.dtype, model.device,
                             static=model.step_graphs is not None)
        self.observer = observer
        self.row_state: list = [None] * len(self.seqs)  # the decoder's own state of each row (quad_spec's draft, infill's gap)
        self.prefilled = 0  # prompt slots cached so far (cache_prompts, prefill_ahead)
        self._states_ahead: torch.Tensor | None = None  # (B, prefilled, hidden) from prefill_ahead

    def __len__(self) -> int:
        return len(self.seqs)

    def forward(self, tokens: torch.Tensor, pattern: Pattern, positions: torch.Tensor | None = None,
                adapter_gate: torch.Tensor | None = None, counted: list[bool] | None = None) -> torch.Tensor:
        """Run the model over (B, T) tokens; each sequence that needed the pass pays one NFE."""
        for seq, needed in zip(self.seqs, counted or [True] * len(self.seqs)):
            seq.metrics.nfe += needed
        run = self.model.step_graphs or self.model
        return run(tokens, positions, self.cache, pattern, adapter_gate)

    def draft_pass(self, block: torch.Tensor, counted: list[bool] | None = None) -> torch.Tensor:
        """Bidirectional pass over (B, L) blocks with the draft adapter on for every token: it
        reads the cache and writes nothing. linear_spec's drafts and diffusion's denoising both
        go through here, so neither can run the base model by mistake (SPEC section 2)."""
        return self.forward(block, "bidirectional", adapter_gate=torch.ones(block.shape, dtype=torch.bool),
                            counted=counted)

    def next_tokens(self, logits: torch.Tensor) -> list[int]:
        """One token per row from (B, V) logits (see `pick_tokens`), within each row's grammar."""
        return self.pick_tokens(self.constrained(logits[:, None]))[0][:, 0].tolist()

    def constrained(self, logits: torch.Tensor, drafts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K+1, V) logits that decide the next token of each row (K = 0) or verify its K
        drafts (B, K) -> the same with what each row's grammar forbids at -inf, slot i under
        the grammar's state after drafts[:i] (decoding/grammar.py). Rows without a grammar,
        and the input, are left as they are."""
        rows = [row for row, seq in enumerate(self.seqs) if seq.grammar is not None]
        if not rows:
            return logits
        logits = logits.clone()
        for row in rows:
            path = drafts[row].tolist() if drafts is not None else []
            allowed = self.seqs[row].grammar.path_masks(path).to(logits.device)  # (K+1, V)
            logits[row].masked_fill_(~allowed, float("-inf"))
        return logits

    def pick(self, logits: torch.Tensor, drawn: torch.Tensor | None = None) -> Picks:
        """`sampler.pick` over (B, K, V) logits, each row with its own parameters and generator."""
        return pick(logits, [s.params for s in self.seqs], [s.generator for s in self.seqs], drawn)

    def pick_tokens(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, K, V) logits -> tokens (B, K) on the host, and the rows' (B, K, V) probabilities
        where any row samples (None when every row is greedy, which takes one argmax and one
        host copy)."""
        if all(seq.params.greedy for seq in self.seqs):
            return logits.argmax(-1).cpu(), None
        picks = self.pick(logits)
        return picks.tokens, picks.probs

    def draft_tokens(self, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, K, hidden) draft-pass states of the K slots after each row's pending token (and
        their (B, K, V) logits, computed here when not given) -> drafts (B, K) and
        probabilities as `pick_tokens` gives them. Greedy rows draft through
        the model's sampler head where it has one (each slot's pick conditioned on the pick
        before it); sampled rows draw from the pass's own distribution, which their
        acceptance test needs. Greedy rows under a grammar have forbidden drafts replaced
        (decoding/grammar.py). Drafts only propose: the verifier decides what is emitted."""
        logits = self.model.logits(hidden) if logits is None else logits  # (B, K, V)
        drafts, probs = self._draft_picks(hidden, logits)
        for row, seq in enumerate(self.seqs):
            if seq.grammar is not None and seq.params.greedy:
                drafts[row] = torch.tensor(seq.grammar.repair(drafts[row].tolist(), logits[row]))
        return drafts, probs

    def _draft_picks(self, hidden: torch.Tensor, logits: torch.Tensor):
        head = self.model.sampler_head
        greedy = [row for row, seq in enumerate(self.seqs) if seq.params.greedy]
        if head is None or not greedy:
            return self.pick_tokens(logits)
        rows = torch.tensor(greedy)
        on_device = rows.to(hidden.device)
        head_drafts = head.greedy_drafts(hidden[on_device], logits[on_device], self.pending_tokens()[rows, 0],
                                         self.model.embed_tokens, self.model.head_weight).cpu()  # (G, K)
        if len(greedy) == len(self.seqs):
            return head_drafts, None
        drafts, probs = self.pick_tokens(logits)
        drafts[rows] = head_drafts
        return drafts, probs

    def pending_tokens(self) -> torch.Tensor:
        # a row that finished at prefill without a token (max_new_tokens 0) drafts from 0;
        # it retires before any step
        return torch.tensor([[0 if s.pending is None else s.pending] for s in self.seqs], dtype=torch.long)  # (B, 1)

    def masks(self, width: int) -> torch.Tensor:
        return torch.full((len(self.seqs), width), self.model.config.mask_token_id, dtype=torch.long)  # (B, width)

    def observed(self, row: int) -> bool:
        """Whether an event about this row has a listener; decoders build payloads only then."""
        return self.observer is not None and self.observer.wants(self.seqs[row])

    def event(self, kind: str, row: int, **payload) -> None:
        """Send one row's event (call only when `observed(row)`)."""
        seq = self.seqs[row]
        self.observer.event(kind, seq, {"row": row, **payload, "nfe": seq.metrics.nfe,
                                        "completion_tokens": len(seq.output_ids)})

    def emit(self, row: int, tokens: list[int], logits: torch.Tensor | None = None) -> int:
        """Append tokens to a row's output; `logits` (>= len(tokens), V) are the causal logits
        that decided them, scored when the sequence asked for logprobs."""
        seq = self.seqs[row]
        k = seq.params.logprobs
        logprobs = score(logits[:len(tokens)], tokens, k) if k is not None and tokens else None
        kept = seq.append(tokens, logprobs)
        if kept and self.observed(row):
            self.event("commit", row, tokens=tokens[:kept])
        return kept

    def retire(self) -> list[Sequence]:
        """Drop finished sequences from the batch, their rows' state and the cache."""
        done = [s for s in self.seqs if s.finished]
        if done:
            keep = compacting_order([not s.finished for s in self.seqs])  # rows move: they carry their state
            self.seqs = [self.seqs[i] for i in keep]
            self.row_state = [self.row_state[i] for i in keep]
            if keep:
                self.cache.keep_rows(keep)
        return done

    def merge(self, other: "DecodeBatch") -> None:
        """Take over `other`'s sequences and cache rows (same mode and block length), so that
        newcomers prefilled on their own join the running batch's next step."""
        if other.block_length != self.block_length:
            raise ValueError(f"cannot merge block_length {other.block_length} into {self.block_length}")
        self.seqs.extend(other.seqs)
        self.row_state.extend(other.row_state)
        self.cache.merge(other.cache)

    def abort(self, seq: Sequence) -> None:
        """End a sequence early (its client left); the next `retire` frees its row."""
        if not seq.finished:
            seq.finish_reason = "abort"

    def prefill(self) -> None:
        """Causal passes over the (right-padded) prompts; emits each sequence's first token."""
        tokens, lengths = self.prompt_tokens()  # (B, P)
        hidden = self.cache_prompts(tokens, lengths, tokens.shape[1])  # (B, P, hidden)
        self.emit_after_prompts(hidden, lengths)

    def prompt_tokens(self) -> tuple[torch.Tensor, list[int]]:
        """The prompts right-padded with zeros, (B, P), and their lengths."""
        lengths = [len(s.prompt_ids) for s in self.seqs]
        tokens = torch.zeros(len(self.seqs), max(lengths), dtype=torch.long)  # (B, P)
        for row, seq in enumerate(self.seqs):
            tokens[row, :lengths[row]] = torch.tensor(seq.prompt_ids)
        return tokens, lengths

    def cache_prompts(self, tokens: torch.Tensor, lengths: list[int], end: int) -> torch.Tensor:
        """Cache the first `end` slots of the (B, P) right-padded prompts (each row's tokens
        among them), in causal passes of at most PREFILL_CHUNK tokens; -> their (B, end, hidden)
        states. `prompt_head_end` is where a caller that passes the rest itself stops. Slots
        `prefill_ahead` cached already are not run again.

        One pass over a long prompt materialises attention scores of its length squared; in
        passes of PREFILL_CHUNK each is at most that by the span, and a row's keys land in the
        slots one pass would have put them in, so its states are the same (model/attention.py)."""
        states = self._prompt_passes(tokens, lengths, end)  # (B, end, hidden)
        self._states_ahead = None
        return states

    def prefill_ahead(self) -> bool:
        """Cache the next PREFILL_CHUNK slots of the prompts' head (all but their last pass),
        so that a scheduler can spread a long prefill over its steps; whether the head is
        cached. The decoder's `start` then runs the rest."""
        tokens, lengths = self.prompt_tokens()  # (B, P)
        head = self.prompt_head_end(tokens.shape[1])
        self._states_ahead = self._prompt_passes(tokens, lengths, min(self.prefilled + PREFILL_CHUNK, head))
        return self.prefilled >= head

    def _prompt_passes(self, tokens: torch.Tensor, lengths: list[int], end: int) -> torch.Tensor:
        """`cache_prompts`' passes from `prefilled` to `end`; -> the states of slots [0, end)."""
        hidden = [torch.empty(len(self.seqs), 0, self.model.config.hidden_size, dtype=self.model.dtype,
                              device=self.model.device) if self._states_ahead is None else self._states_ahead]
        for lo in range(self.prefilled, end, PREFILL_CHUNK):
            hi = min(lo + PREFILL_CHUNK, end)
            hidden.append(self.model(tokens[:, lo:hi], None, self.cache, "causal"))  # (B, hi - lo, hidden)
            self.count_prefill(lengths, lo)
            self.cache.advance([min(max(n - lo, 0), hi - lo) for n in lengths])
            self.prefilled = hi
        return torch.cat(hidden, dim=1)  # (B, end, hidden)

    @staticmethod
    def prompt_head_end(width: int) -> int:
        """Where the last prefill pass over prompts `width` slots wide starts."""
        return max(width - 1, 0) // PREFILL_CHUNK * PREFILL_CHUNK

    def count_prefill(self, lengths: list[int], start: int) -> None:
        """A prefill pass from slot `start` costs an NFE to each row with prompt tokens in it."""
        for seq, n in zip(self.seqs, lengths):
            seq.metrics.prefill_nfe += n > start

    def emit_after_prompts(self, hidden: torch.Tensor, lengths: list[int]) -> None:
        """Emit each sequence's first token from (B, P', hidden) states whose row b holds its
        prompt in the first lengths[b] slots; score the prompts that asked for it."""
        for row, seq in enumerate(self.seqs):
            k = seq.params.prompt_logprobs
            if k is not None:  # slot i predicts i+1
                seq.prompt_logprobs = [None]
                for lo in range(0, lengths[row] - 1, PROMPT_SCORE_ROWS):
                    hi = min(lo + PROMPT_SCORE_ROWS, lengths[row] - 1)
                    prompt_logits = self.model.logits(hidden[row, lo:hi])  # (hi - lo, V)
                    seq.prompt_logprobs += score(prompt_logits, seq.prompt_ids[lo + 1:hi + 1], k)
        last = hidden[torch.arange(len(self.seqs)), torch.tensor(lengths) - 1]  # (B, hidden)
        logits = self.model.logits(last)  # (B, V)
        for row, token in enumerate(self.next_tokens(logits)):
            if self.seqs[row].params.max_new_tokens == 0:
                self.seqs[row].finish_empty()
            else:
                self.emit(row, [token], logits[row:row + 1])
