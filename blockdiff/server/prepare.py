"""Turn a validated API request into what the engine runs: prompt ids, SamplingParams and,
for fill-in-the-middle, suffix ids. Every rejection names its API parameter."""
from __future__ import annotations

from dataclasses import dataclass

from blockdiff.decoding.grammar import GrammarError, StructuredOutputs
from blockdiff.decoding.logprobs import MAX_LOGPROBS
from blockdiff.sampling import InvalidParameter, SamplingParams, check_token_ids
from blockdiff.server.config import ServerConfig
from blockdiff.server.errors import APIError, from_invalid_parameter
from blockdiff.server.protocol import ChatMessage, ChatRequest, CommonRequest, CompletionRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    suffix_ids: list[int] | None = None
    echo_text: str | None = None  # completions with echo: the prompt's text, sent before the output
    prompt_param: str = "prompt"  # the request field the prompt came from, for error bodies


# vLLM's guided_* fields -> the StructuredOutputs field each sets
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
STRUCTURED_KEYS = ("json", "json_object", "regex", "choice", "grammar")


def structured_outputs(req: CommonRequest) -> StructuredOutputs | None:
    """The grammar a request asks its output to follow: OpenAI's response_format (json_object,
    json_schema), vLLM's guided_* fields or its structured_outputs object; at most one of them.
    A 400 names the field that is wrong."""
    given: dict[str, dict] = {}
    if req.response_format is not None:
        kind = req.response_format.get("type")
        if kind == "json_object":
            given["response_format"] = {"json_object": True}
        elif kind == "json_schema":
            spec = req.response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise APIError(400, "response_format json_schema needs json_schema: {name, schema}",
                               "response_format", "invalid_value")
            given["response_format"] = {"json": spec["schema"]}
        elif kind != "text":
            raise APIError(400, f"response_format type {kind!r} is not supported; allowed: text, json_object, "
                           f"json_schema", "response_format", "invalid_value")
    for name, key in GUIDED_FIELDS.items():
        if getattr(req, name) is not None:
            given[name] = {key: getattr(req, name)}
    if req.structured_outputs is not None:
        spec = req.structured_outputs
        unknown = sorted(set(spec) - set(STRUCTURED_KEYS)) if isinstance(spec, dict) else None
        if unknown is None or unknown:
            raise APIError(400, f"structured_outputs must be an object with one of {', '.join(STRUCTURED_KEYS)}"
                           + (f"; {unknown} are not supported" if unknown else ""), "structured_outputs",
                           "invalid_value")
        given["structured_outputs"] = spec
    if len(given) > 1:
        first, second = list(given)[:2]
        raise APIError(400, f"{second} and {first} both constrain the output; send one", second, "invalid_value")
    if not given:
        return None
    (name, spec), = given.items()
    try:
        return StructuredOutputs(**spec)
    except GrammarError as e:
        raise APIError(400, f"{name}: {e}", name, "invalid_value") from None


def _refuse_contract_changes(req: CommonRequest) -> None:
    """Fields that would change what the answer may be and that blockdiff cannot honour:
    a 400 naming each, never an answer the client did not ask for."""
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias", "unsupported")
    if isinstance(req, ChatRequest):
        for tools, choice in (("tools", "tool_choice"), ("functions", "function_call")):
            if getattr(req, tools) and getattr(req, choice) != "none":
                raise APIError(400, f"{tools} need a tool-call parser, which blockdiff does not have; send "
                               f"{choice}: 'none' to have them only shown to the model", tools, "unsupported")
            if getattr(req, choice) not in (None, "none", "auto"):
                raise APIError(400, f"{choice} {getattr(req, choice)!r} is not supported (no tool-call parser)",
                               choice, "unsupported")


def _unsupported(req: CommonRequest) -> None:
    _refuse_contract_changes(req)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only valid with stream: true", "stream_options", "invalid_value")
    if req.return_steps and not req.stream:
        raise APIError(400, "return_steps is only valid with stream: true (step events are stream chunks)",
                       "return_steps", "invalid_value")
    if req.n != 1:
        raise APIError(400, f"n must be 1 (got {req.n}); send one request per sample", "n", "unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) != 0:
            raise APIError(400, f"{name} is not supported; use 0", name, "unsupported")
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of must be 1", "best_of", "unsupported")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo: true, to score the prompt)",
                           "max_tokens", "invalid_value")
    if isinstance(req, ChatRequest) and req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                           "top_logprobs", "invalid_value")


def logprob_params(req: CommonRequest, max_tokens: int) -> dict:
    """SamplingParams' logprobs fields for this request: completions score the prompt too with
    echo (a prompt-only answer, max_tokens 0, is how lm-evaluation-harness scores a continuation)."""
    if isinstance(req, ChatRequest):
        return {"logprobs": (req.top_logprobs or 0) if req.logprobs else None}
    prompt = req.logprobs if req.echo else None
    if req.echo and max_tokens == 0 and prompt is None:
        prompt = 0  # nothing to generate: the engine still runs the prompt (it has nothing else to do)
    return {"logprobs": req.logprobs, "prompt_logprobs": prompt}


def sampling_params(req: CommonRequest, cfg: ServerConfig, max_tokens: int, mode: str,
                    structured: StructuredOutputs | None) -> SamplingParams:
    """`structured` is `structured_outputs(req)`, compiled once per request."""
    top_k = req.top_k if req.top_k is not None else 0
    try:
        params = SamplingParams(
            mode=mode, max_new_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=0 if top_k == -1 else top_k,
            min_p=req.min_p or 0.0, block_length=cfg.block_length if req.block_length is None else req.block_length,
            threshold=cfg.threshold if req.threshold is None else req.threshold,
            stop=req.stop_list(), stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
            seed=req.seed, min_tokens=req.min_tokens, structured_outputs=structured,
            **logprob_params(req, max_tokens))
    except InvalidParameter as e:
        raise from_invalid_parameter(e) from None
    if params.mode == "quad_spec" and (params.block_length or 0) > cfg.max_quad_block_length:
        raise APIError(400, f"quad_spec block_length must be <= {cfg.max_quad_block_length} (its fused pass "
                       f"costs L*(L+1) tokens), got {params.block_length}", "block_length", "invalid_value")
    return params


def check_ids(ids: list[int], vocab: int, param: str) -> None:
    """`sampling.check_token_ids` as a 400 naming `param`."""
    try:
        check_token_ids(ids, vocab, param)
    except InvalidParameter as e:
        raise from_invalid_parameter(e) from None


def _max_tokens(llm, prompt_ids: list[int], requested: int | None, default: int | None) -> int:
    """max_tokens as asked, else the endpoint's default, else what the context leaves (at least
    1: whether the prompt fits is `LLM.make_sequence`'s check, made when the request is submitted)."""
    if requested is not None:
        return requested
    return default if default is not None else max(1, llm.max_context - len(prompt_ids))


def _mode(req: CommonRequest, cfg: ServerConfig, infill: bool) -> str:
    mode = req.mode or ("diffusion" if infill else cfg.mode)
    if infill and mode != "diffusion":
        raise APIError(400, f"suffix (fill-in-the-middle) is decoded by block diffusion; mode must be "
                       f"'diffusion', got {mode!r}", "suffix", "unsupported")
    return mode


def prepare_completion(llm, req: CompletionRequest, cfg: ServerConfig) -> list[Prepared]:
    _unsupported(req)
    prompts = req.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise APIError(400, "prompt is empty", "prompt", "invalid_value")
    infill = bool(req.suffix)
    if infill and req.stream and len(prompts) > 1:
        raise APIError(400, "send one prompt per streaming fill-in-the-middle request", "prompt", "unsupported")
    if infill and req.return_steps:
        raise APIError(400, "return_steps is not supported with suffix (fill-in-the-middle)", "return_steps",
                       "unsupported")
    mode = _mode(req, cfg, infill)
    suffix_ids = llm.tokenizer.encode(req.suffix) if infill else None
    structured = structured_outputs(req)
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = llm.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        else:
            ids = list(prompt)
        max_tokens = _max_tokens(llm, ids, req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
        echo_text = (prompt if isinstance(prompt, str) else llm.tokenizer.decode(ids)) if req.echo else None
        out.append(Prepared(ids, sampling_params(req, cfg, max_tokens, mode, structured), suffix_ids, echo_text))
    check_ids(list(req.stop_token_ids or []), llm.vocab_size, "stop_token_ids")
    return out


def render_chat(llm, messages: list[ChatMessage], add_generation_prompt: bool, template_kwargs: dict | None) -> str:
    """The chat template applied to the messages; a 400 for a turn without content (only an
    assistant's tool-calling turn may have none), when the model has no template or it raises."""
    for i, message in enumerate(messages):
        if message.content is None and message.role != "assistant":
            raise APIError(400, f"messages[{i}].content is required for a {message.role!r} message",
                           f"messages[{i}].content", "invalid_value")
    if not llm.tokenizer.chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages", "unsupported")
    try:
        return llm.tokenizer.apply_chat_template([m.to_template() for m in messages],
                                                 add_generation_prompt=add_generation_prompt, **(template_kwargs or {}))
    except Exception as e:  # a template that raises on these messages is the caller's input problem
        raise APIError(400, f"the chat template rejected these messages: {e}", "messages", "invalid_value") from None


def prepare_chat(llm, req: ChatRequest, cfg: ServerConfig) -> Prepared:
    _unsupported(req)
    if not req.messages:
        raise APIError(400, "messages is empty", "messages", "invalid_value")
    mode = _mode(req, cfg, infill=False)
    text = render_chat(llm, req.messages, req.add_generation_prompt, req.chat_template_kwargs)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = _max_tokens(llm, ids, requested, None)
    check_ids(list(req.stop_token_ids or []), llm.vocab_size, "stop_token_ids")
    return Prepared(ids, sampling_params(req, cfg, max_tokens, mode, structured_outputs(req)), prompt_param="messages")
