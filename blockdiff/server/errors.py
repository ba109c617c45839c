"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}, never a stack trace."""
from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from blockdiff.sampling import ContextLengthExceeded, InvalidParameter

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "service_unavailable"}
# SamplingParams' names -> the API's names
PARAM_NAMES = {"max_new_tokens": "max_tokens"}
NESTED_FIELDS = {"role", "content", "text", "type", "include_usage"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(error_body(self.message, TYPES.get(self.status, "invalid_request_error"),
                                       self.param, self.code), status_code=self.status, headers=headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def from_invalid_parameter(e: InvalidParameter, prompt_param: str = "prompt") -> APIError:
    """The 400 for a library error, named as the request names the field ("max_tokens" for
    max_new_tokens, "messages" for a chat's prompt); too long for the context is OpenAI's
    context_length_exceeded."""
    param = prompt_param if e.param == "prompt" else PARAM_NAMES.get(e.param, e.param)
    code = "context_length_exceeded" if isinstance(e, ContextLengthExceeded) else "invalid_value"
    return APIError(400, str(e).replace("max_new_tokens", "max_tokens"), param, code)


def from_validation_error(e: ValidationError) -> APIError:
    """The first pydantic error, with its location as the param ("messages[0].content")."""
    first = e.errors()[0]
    param = _param_path(first["loc"])
    message = first["msg"]
    if first["type"] == "missing":
        message = f"{param} is required"
    elif param:
        message = f"{param}: {message}"
    return APIError(400, message, param, "invalid_type" if first["type"] != "missing" else "missing")


def _param_path(loc: tuple) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not parts:
            parts.append(item)
        elif item in NESTED_FIELDS:  # pydantic also puts union members ("str", "list[str]") here
            parts.append("." + item)
        else:
            break
    path = "".join(parts)
    return path or None
