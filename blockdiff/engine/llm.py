"""The LLM class: load a checkpoint once, decode in any mode per call (vLLM-style API)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from blockdiff.decoding.batch import EventHook
from blockdiff.decoding.grammar import GrammarCompiler
from blockdiff.decoding.logprobs import TokenLogprob
from blockdiff.decoding.metrics import Metrics
from blockdiff.decoding.sequence import Sequence
from blockdiff.engine.auto import LOSSLESS, AutoMode
from blockdiff.engine.block_lengths import (SPEC_MODES, best_rate, check_spec_disable_batch_size, choose_block_lengths,
                                            load_profile, speculation_limits)
from blockdiff.engine.request import Request
from blockdiff.engine.scheduler import Scheduler
from blockdiff.model.adapter import load_adapter
from blockdiff.model.autotune import choose_quantization, forward_timer
from blockdiff.model.checkpoint import load_checkpoint
from blockdiff.model.dtype import resolve_dtype
from blockdiff.model.registry import resolve_model
from blockdiff.model.step_graphs import StepGraphs
from blockdiff.model.transformer import Transformer
from blockdiff.sampling import (DECODING_MODES, DEFAULT_BLOCK_LENGTHS, ContextLengthExceeded, InvalidParameter,
                                SamplingParams, check_token_ids)

@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    metrics: Metrics
    mode: str
    logprobs: list[TokenLogprob] | None = None  # per output token, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (the first None)
    block_length: int | None = None  # what it decoded with: the engine's default where the request left it out

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "mode": self.mode, "prompt_tokens": len(self.prompt_token_ids), "metrics": self.metrics.to_dict()}


def check_block_lengths(setting: str | dict[str, int]) -> dict[str, int] | None:
    """LLM's block_lengths argument: a dict of explicit lengths, checked, or None for "auto"."""
    if setting == "auto":
        return None
    if not isinstance(setting, dict):
        raise ValueError(f"block_lengths must be 'auto' or a dict of mode: length, got {setting!r}")
    bad = {m: L for m, L in setting.items() if m not in DECODING_MODES or not isinstance(L, int)
           or isinstance(L, bool) or not 0 < L <= 1024}
    if bad:
        raise ValueError(f"block_lengths maps modes ({', '.join(DECODING_MODES)}) to integers in [1, 1024], got {bad}")
    return setting


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str = "auto", device: str = "cpu",
                 adapter: str | None = None, mask_token_id: int | None = None, max_batch_size: int = 64,
                 auto_modes: tuple[str, ...] = LOSSLESS, quantization: str = "none",
                 cuda_graphs: bool = False, block_lengths: str | dict[str, int] = "auto",
                 spec_disable_batch_size: str | int | None = "auto"):
        """block_lengths: each mode's block length where a request leaves it out. "auto": for the
        spec modes, the fastest on this machine (engine/block_lengths.py: from the adapter's
        acceptance.json and forwards timed at load), where the adapter ships a profile; otherwise,
        and for the other modes, sampling.DEFAULT_BLOCK_LENGTHS. A dict sets modes explicitly.

        spec_disable_batch_size: while this many sequences run, the spec modes take plain AR
        steps (the same tokens at temperature 0). "auto": per mode, the batch size past which
        speculation was measured to lose on this machine (from the same profile and timings;
        never where the adapter ships no profile); None: never."""
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"unknown device {device!r}; allowed: cpu, cuda")
        if cuda_graphs and not device.startswith("cuda"):
            raise ValueError(f"cuda_graphs replays CUDA graphs and needs device='cuda', not {device!r}")
        explicit_block_lengths = check_block_lengths(block_lengths)
        check_spec_disable_batch_size(spec_disable_batch_size)
        torch_dtype = resolve_dtype(dtype, device)
        torch.set_flush_denormal(True)  # denormals slow CPU matmuls by up to 9x
        source = resolve_model(model)
        ckpt = load_checkpoint(source.path)
        self.config = ckpt.config
        if mask_token_id is not None:
            self.config.mask_token_id = mask_token_id
        elif self.config.mask_token_id is None:
            self.config.mask_token_id = source.mask_token_id
        self.tokenizer = ckpt.tokenizer
        self.grammars = GrammarCompiler(self.tokenizer, self.config.vocab_size)
        self.model = Transformer(self.config)
        self.model.load_state_dict(ckpt.state_dict, strict=True)
        self.model.to(device=device, dtype=torch_dtype).eval()
        self.adapter = adapter or source.adapter
        if self.adapter:
            load_adapter(self.model, self.adapter)
        self.model_path = source.path
        self.max_batch_size = max_batch_size
        # learns from every decode step of every scheduler, whatever its mode; spec modes need a mask token
        self.auto = AutoMode(tuple(auto_modes) if self.config.mask_token_id is not None else ("ar",))
        profile = load_profile(self.adapter) if self.adapter and self.config.mask_token_id is not None else None
        self.quantization_rates: dict[str, float] | None = None  # what quantization="auto" expected, tokens/s
        if quantization == "auto":
            def rate(seconds):  # the fastest of auto's modes at the block lengths these timings choose
                return best_rate(profile, self._block_lengths(explicit_block_lengths, profile, seconds)[0],
                                 self.auto.candidates, seconds)
            most = profile.most_tokens_per_step() if profile is not None else 1.0
            _, self.quantization_rates, seconds = choose_quantization(self.model, rate, most)
        else:
            self.model.prepare_for_inference(quantization)
            seconds = forward_timer(self.model)
        self.block_lengths, self.block_length_estimates = self._block_lengths(explicit_block_lengths, profile, seconds)
        self.spec_limits = self._spec_limits(spec_disable_batch_size, profile, seconds)
        if cuda_graphs:
            self.model.step_graphs = StepGraphs(self.model)

    def _block_lengths(self, explicit: dict[str, int] | None, profile, seconds
                       ) -> tuple[dict[str, int], dict | None]:
        """-> (the default block length of every mode, the tokens/s estimates behind the spec
        modes' choice when they were measured)."""
        table = dict(DEFAULT_BLOCK_LENGTHS)
        if explicit is not None:
            return table | explicit, None
        if profile is None:
            return table, None
        chosen, estimates = choose_block_lengths(profile, seconds)
        return table | chosen, estimates

    def _spec_limits(self, setting: str | int | None, profile, seconds) -> dict[str, int]:
        """{spec mode: the number of running sequences at which it takes AR steps}."""
        if setting is None or self.config.mask_token_id is None:
            return {}
        if setting != "auto":
            return dict.fromkeys(SPEC_MODES, setting)
        if profile is None:
            return {}
        return speculation_limits(profile, self.block_lengths, seconds, self.max_batch_size)

    def make_scheduler(self, max_running: int | None = None) -> Scheduler:
        """The driver of every decode: generate() makes one per call, the server's engine thread
        one for its lifetime. They share this model and the `auto` selector."""
        return Scheduler(self.model, self.auto, max_running or self.max_batch_size, self.block_lengths,
                         self.spec_limits)

    def auto_mode_report(self) -> dict:
        """mode="auto"'s candidates and what it has measured so far, by load."""
        return {"candidates": list(self.auto.candidates), "measured": self.auto.report()}

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def encode(self, prompt: str | list[int], *, chat: bool = False, reserved: int = 0) -> list[int]:
        """A prompt's token ids, checked: not empty, in the vocabulary, and shorter than the
        context with `reserved` more tokens (an infilling suffix) beside it. Raises
        InvalidParameter("prompt"), ContextLengthExceeded when it does not fit."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=not chat) if prompt else []
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidParameter("prompt", "prompt is empty")
        check_token_ids(ids, self.config.vocab_size, "prompt")
        if len(ids) + reserved >= self.max_context:
            raise ContextLengthExceeded("prompt", f"prompt is {len(ids) + reserved} tokens; the model's context "
                                                  f"is {self.max_context}")
        return ids

    def make_sequence(self, prompt: str | list[int], params: SamplingParams, *, chat: bool = False,
                      suffix: list[int] | None = None) -> Sequence:
        """A request's decoding state, the one place a prompt is checked for both the library and
        the server: raises InvalidParameter naming the field (the mode, when it needs a mask token
        the model lacks; the suffix, when off the vocabulary; ContextLengthExceeded when the
        prompt, the suffix and max_new_tokens do not fit; GrammarError for a structured-output
        grammar that does not compile). With a `suffix`, the sequence fills the gap of
        max_new_tokens between the prompt and it (decoding/infill.py)."""
        reserved = len(suffix) if suffix is not None else 0
        if suffix is not None:
            check_token_ids(suffix, self.config.vocab_size, "suffix")
        ids = self.encode(prompt, chat=chat, reserved=reserved)
        if params.mode not in ("ar", "auto") and self.config.mask_token_id is None:
            raise InvalidParameter("mode", f"mode {params.mode!r} needs a mask token and this model has none; "
                                           f"use 'ar'")
        if len(ids) + reserved + params.max_new_tokens > self.max_context:
            raise ContextLengthExceeded("max_new_tokens", f"prompt ({len(ids) + reserved} tokens) + max_new_tokens "
                                                          f"({params.max_new_tokens}) exceeds the model's context of "
                                                          f"{self.max_context}")
        spec = params.structured_outputs
        return Sequence(ids, params, frozenset(self.tokenizer.eos_token_ids), self.tokenizer.decode,
                        grammar=self.grammars.grammar(spec) if spec is not None else None,
                        suffix_ids=list(suffix) if suffix is not None else None)

    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 *, use_tqdm: bool = True, on_event: EventHook | None = None, chat: bool = False,
                 **kwargs) -> list[RequestOutput]:
        """Decode every prompt on the scheduler: sequences that share mode and block length are
        batched together, up to max_batch_size sequences at a time across all modes.

        Extra keyword arguments build the SamplingParams: llm.generate(p, mode="diffusion").
        on_event(kind, payload) hears every sequence's step events (decoding/batch.py).
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None:
            params = SamplingParams.from_kwargs(**kwargs)
        elif kwargs:
            SamplingParams.check_names(kwargs)
            params = dataclasses.replace(params, **kwargs)
        param_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError(f"{len(param_list)} SamplingParams for {len(prompts)} prompts")
        requests = [Request(self.make_sequence(p, sp, chat=chat), on_step=on_event)
                    for p, sp in zip(prompts, param_list)]
        scheduler = self.make_scheduler()
        for request in requests:
            scheduler.add(request)
        total = sum(sp.max_new_tokens for sp in param_list)
        with tqdm(total=total, unit="tok", desc="generate", disable=not use_tqdm, leave=False) as bar:
            for _, update in scheduler.drain():
                bar.update(update.new_tokens)
        failed = next((r for r in requests if r.exception is not None), None)
        if failed is not None:
            raise failed.exception
        return [self._output(p, r.seq) for p, r in zip(prompts, requests)]

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             **kwargs) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, params, chat=True, **kwargs)

    def _output(self, prompt, seq: Sequence) -> RequestOutput:
        text = self.tokenizer.decode(seq.output_ids)
        if seq.stop_text_end is not None:
            text = text[:seq.stop_text_end]
        return RequestOutput(prompt if isinstance(prompt, str) else None, seq.prompt_ids, text,
                             list(seq.output_ids), seq.finish_reason, seq.metrics, seq.params.mode,
                             seq.logprobs if seq.params.logprobs is not None else None, seq.prompt_logprobs,
                             seq.params.block_length)
