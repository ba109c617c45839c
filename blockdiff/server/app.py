"""The FastAPI app: routes, authentication, body limits and OpenAI-shaped errors.

`build_app(llm, config)` wires an already loaded LLM to a new Engine; the engine thread
starts with the app and stops when uvicorn shuts down (after in-flight requests had
`graceful_timeout_s` to finish; whatever is left then ends with a clean error).
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import blockdiff
from blockdiff.model.dtype import dtype_name
from blockdiff.server.config import ServerConfig
from blockdiff.server.engine import Engine, EngineConfig
from blockdiff.server.errors import TYPES, APIError, error_body, from_validation_error
from blockdiff.server.handlers import Call, complete, stream
from blockdiff.server.metrics import ServerMetrics
from blockdiff.server.playground import mount_playground
from blockdiff.server.prepare import check_ids, prepare_chat, prepare_completion, render_chat
from blockdiff.server.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

log = logging.getLogger("blockdiff.server")
# vLLM's tokenizer endpoints (lm-evaluation-harness tokenizes through them); guarded like /v1/*
TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


MAX_JSON_DEPTH = 32  # nesting levels a body may have; the API's own schemas use fewer than 6


def check_json(data, max_depth: int = MAX_JSON_DEPTH) -> None:
    """400 for a body nested deeper than `max_depth` or holding text that is not valid
    Unicode (a lone UTF-16 surrogate such as "\\ud800", which JSON allows to be escaped);
    iterative, so no body can exhaust the stack."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise APIError(400, f"the body is nested deeper than {max_depth} levels", None, "invalid_json")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "the body holds text that is not valid Unicode (a lone surrogate escape)",
                               None, "invalid_json") from None


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past `limit` bytes (checked before reading it all)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit}", None, "body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", None, "body_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
    except RecursionError:
        raise APIError(400, f"the body is nested deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", None, "invalid_json")
    check_json(data)
    return data


def build_app(llm, config: ServerConfig) -> FastAPI:
    name = config.model_name()
    engine = Engine(llm.make_scheduler(config.max_running_requests), EngineConfig(config.max_queue))
    metrics = ServerMetrics(name, engine)
    engine.observer = metrics.observe

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        log.info("serving %s (default mode %s) on %s:%s", name, config.mode, config.host, config.port)
        yield
        engine.stop()

    app = FastAPI(title="blockdiff", version=getattr(blockdiff, "__version__", "0"),
                  lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.llm, app.state.config = engine, metrics, llm, config

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return APIError(400, str(e.errors()[0].get("msg")), None, "invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), TYPES.get(e.status_code, "invalid_request_error")),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if config.api_key and (request.url.path.startswith("/v1/") or request.url.path in TOKENIZER_PATHS):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {config.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                None, "invalid_api_key").response()
        return await call_next(request)

    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {name!r}",
                           "model", "model_not_found")

    async def parse(request: Request, schema):
        body = await read_json(request, config.max_body_bytes)
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            raise from_validation_error(e) from None
        check_model(req.model)
        return req

    async def answer(request: Request, call: Call, prepared, streaming: bool):
        if streaming:
            return stream(engine, llm, call, prepared)
        return await complete(request, engine, llm, call, prepared)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prepared = prepare_completion(llm, req, config)
        call = Call("completion", name, req.return_token_ids, req.include_usage, req.return_steps,
                    logprobs=req.logprobs is not None)
        return await answer(request, call, prepared, req.stream)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        prepared = [prepare_chat(llm, req, config)]
        call = Call("chat", name, req.return_token_ids, req.include_usage, req.return_steps, logprobs=req.logprobs)
        return await answer(request, call, prepared, req.stream)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await parse(request, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", "prompt", "invalid_value")
        if req.prompt is not None:
            ids = llm.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids = llm.tokenizer.encode(render_chat(llm, req.messages, req.add_generation_prompt, None))
        return {"count": len(ids), "max_model_len": llm.max_context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await parse(request, DetokenizeRequest)
        check_ids(req.tokens, llm.vocab_size, "tokens")
        return {"prompt": llm.tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = llm.tokenizer
        return {"tokenizer_class": "blockdiff.Tokenizer", "model_max_length": llm.max_context,
                "bos_token": tok.bos_token, "eos_token": tok.eos_tokens[0] if tok.eos_tokens else None,
                "pad_token": None, "chat_template": tok.chat_template}

    mount_playground(app)  # GET / and /static/*: the live playground page

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(metrics.started),
                                            "owned_by": "blockdiff", "root": llm.model_path,
                                            "max_model_len": llm.max_context}]}

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse(error_body(engine.error or "the engine is not running", "service_unavailable"),
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/get_server_info")
    async def server_info():
        uptime = time.time() - metrics.started
        return {"model_path": llm.model_path, "served_model_name": name, "default_mode": config.mode,
                "dtype": dtype_name(llm.dtype),
                "block_length": config.block_length or llm.block_lengths, "threshold": config.threshold,
                "spec_disable_batch_size": llm.spec_limits,
                "max_running_requests": config.max_running_requests, "max_queue": config.max_queue,
                "max_body_bytes": config.max_body_bytes, "context_length": llm.max_context,
                "auto_mode": llm.auto_mode_report(),
                "internal_states": [{"avg_spec_accept_length": metrics.avg_spec_accept_length,
                                     "num_running_reqs": engine.num_running, "num_waiting_reqs": engine.num_waiting,
                                     "finished_requests": metrics.finished_requests,
                                     "generated_tokens": metrics.generated_tokens,
                                     "avg_gen_throughput": metrics.generated_tokens / uptime if uptime else 0.0}]}

    return app
