"""Request bodies of the OpenAI-compatible API (pydantic, strict types).

Strict: a string where a number belongs is an error, not a silent coercion. Fields a user
of OpenAI, vLLM or SGLang may send and that blockdiff does not use are accepted and ignored
(as vLLM does), unless ignoring them would change the answer: those are declared here
so that server/prepare.py can refuse them with a 400 that names them.
Range checks live in SamplingParams, which names the offending parameter.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Number = float  # strict float still accepts JSON integers


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class CommonRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None  # optional, as in vLLM; when given it must be the served name
    max_tokens: int | None = None
    temperature: Number | None = None  # OpenAI's default is 1.0
    top_p: Number | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    user: str | None = None
    # vLLM extras (top level of the JSON; the openai client's extra_body puts them there)
    top_k: int | None = None  # 0 or -1: off
    min_p: Number | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    return_token_ids: bool = False  # vLLM: add token_ids to each choice
    # blockdiff extras: the decoding mode per request (defaults come from `blockdiff serve`)
    mode: str | None = None
    block_length: int | None = None
    threshold: Number | None = None
    return_steps: bool = False  # stream step events too (server/steps.py); needs stream: true
    # structured output (server/prepare.py:structured_outputs): at most one of these
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    logit_bias: dict[str, Any] | None = None  # not supported: refused when non-empty

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None  # fill-in-the-middle, decoded by block diffusion
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"] = "text"
    text: str


ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool calls etc. reach the template
    role: Literal[ROLES]
    content: str | list[TextPart] | None = None  # None only for an assistant's (tool-calling) turn

    def to_template(self) -> dict:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ChatRequest(CommonRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer OpenAI name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the template."""
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # prompts only, as in vLLM
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[int]
