"""Run prepared prompts on the engine and answer: one JSON body, or an SSE stream.

The engine thread reports each request's progress through loop.call_soon_threadsafe into
one asyncio queue per HTTP request; a client that goes away has its requests aborted, which
frees their slots at the engine's next step.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from blockdiff.decoding.grammar import GrammarError
from blockdiff.decoding.metrics import Metrics
from blockdiff.engine.request import Request, Update
from blockdiff.sampling import InvalidParameter
from blockdiff.server.engine import Engine, EngineStopped, QueueFull
from blockdiff.server.errors import APIError, error_body, from_invalid_parameter
from blockdiff.server.logprobs import LogprobFormatter, StreamedLogprobs
from blockdiff.server.prepare import Prepared
from blockdiff.server.steps import Step, StepBacklog, StepFormatter, step_chunk
from blockdiff.server.streaming import SSE_DONE, TextTracker, sse

DISCONNECT_POLL_S = 0.5


@dataclass
class Call:
    """One HTTP request's view of its engine requests (one per prompt)."""
    kind: str  # "completion" or "chat"
    model_name: str
    return_token_ids: bool
    include_usage: bool
    return_steps: bool = False  # the step-events extension (server/steps.py); streams only
    logprobs: bool = False  # answer with `logprobs` objects (server/logprobs.py)
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def head(self, chunk: bool = False) -> dict:
        obj = self.object + (".chunk" if chunk and self.kind == "chat" else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name}


def response_metrics(request: Request, update: Update) -> dict:
    m = update.metrics or Metrics()
    queue = (request.scheduled - request.arrival) if request.scheduled is not None else 0.0
    return {"mode": request.mode, "nfe": m.nfe, "prefill_nfe": m.prefill_nfe, "tpf": m.tpf, "steps": m.steps,
            "tokens_per_step": m.tokens_per_step, "acceptance": m.acceptance, "drafted_tokens": m.drafted_tokens,
            "accepted_tokens": m.accepted_tokens, "ttft_s": m.ttft_s, "queue_time_s": queue,
            "generation_time_s": max(0.0, m.wall_s - queue), "e2e_s": m.wall_s, "tokens_per_s": m.tokens_per_s}


def usage(requests: list[Request], finals: dict[int, Update]) -> dict:
    prompt = sum(len(r.seq.prompt_ids) for r in requests)
    completion = sum(len(u.token_ids) for u in finals.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def submit(engine: Engine, llm, prepared: list[Prepared], backlog: StepBacklog | None = None
           ) -> tuple[list[Request], asyncio.Queue]:
    """Queue the prompts; their updates arrive in order on the returned queue as (prompt
    index, update), and, given a `backlog`, their Step events through it on its queue."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = backlog.queue if backlog is not None else asyncio.Queue()
    requests = []
    for index, p in enumerate(prepared):
        try:
            seq = llm.make_sequence(p.prompt_ids, p.params, suffix=p.suffix_ids)
        except GrammarError as e:  # a grammar that compiles alone but not against this vocabulary
            raise APIError(400, str(e), "structured_outputs", "invalid_value") from None
        except InvalidParameter as e:  # the prompt is empty, off the vocabulary or too long
            raise from_invalid_parameter(e, prompt_param=p.prompt_param) from None
        on_update = (lambda u, i=index: loop.call_soon_threadsafe(queue.put_nowait, (i, u)))
        on_step = ((lambda kind, payload, i=index: loop.call_soon_threadsafe(backlog.offer, i, Step(kind, payload)))
                   if backlog is not None else None)
        requests.append(Request(seq, on_update, on_step=on_step))
    try:
        for r in requests:
            engine.submit(r)
    except QueueFull as e:
        _abort(engine, requests)
        raise APIError(429, str(e), None, "rate_limit_exceeded") from None
    except EngineStopped as e:
        _abort(engine, requests)
        raise APIError(503, f"the engine is not accepting requests: {e}", None, "service_unavailable") from None
    return requests, queue


def _abort(engine: Engine, requests: list[Request]) -> None:
    for r in requests:
        if not r.done:
            engine.abort(r)


def _joined(first: dict, second: dict) -> dict:
    """Two completions logprobs objects, one after the other."""
    return {key: first[key] + second[key] for key in first}


def _failure(update: Update) -> APIError:
    return APIError(503 if "shutting down" in (update.error or "") else 500,
                    update.error or "the request was aborted", None, "engine_error")


async def complete(http: HTTPRequest, engine: Engine, llm, call: Call, prepared: list[Prepared]) -> Response:
    """Non-streaming: wait for every prompt, watching for a client that disconnects."""
    requests, queue = submit(engine, llm, prepared)
    trackers = [TextTracker(llm.tokenizer.decode, r.seq.params.stop) for r in requests]
    finals: dict[int, Update] = {}
    try:
        while len(finals) < len(requests):
            try:
                index, update = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; the finally frees the slots
                continue
            if update.finish_reason is not None:
                finals[index] = update
    finally:
        _abort(engine, requests)
    for update in finals.values():
        if update.finish_reason in ("error", "abort"):
            return _failure(update).response()
    formatter = LogprobFormatter(llm.tokenizer)
    choices = []
    for i, r in enumerate(requests):
        u = finals[i]
        text = trackers[i].final_text(u)
        choice = {"index": i, "finish_reason": u.finish_reason}
        if call.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = formatter.chat(u.logprobs) if call.logprobs else None
        else:
            echo = prepared[i].echo_text
            logprobs = None
            if call.logprobs:
                logprobs = formatter.completion(u.token_ids, u.logprobs, len(echo or ""))
                if echo is not None:
                    logprobs = _joined(formatter.completion(r.seq.prompt_ids, u.prompt_logprobs), logprobs)
            choice.update(text=(echo or "") + text, logprobs=logprobs)
        if call.return_token_ids:
            choice["token_ids"] = u.token_ids
        choice["metrics"] = response_metrics(r, u)
        choices.append(choice)
    body = {**call.head(), "choices": choices, "usage": usage(requests, finals), "metrics": choices[0]["metrics"]}
    if call.return_token_ids:
        body["prompt_token_ids"] = requests[0].seq.prompt_ids
    return JSONResponse(body)


def stream(engine: Engine, llm, call: Call, prepared: list[Prepared]) -> StreamingResponse:
    """SSE: committed text only, then a finish chunk per prompt, usage if asked, [DONE]."""
    backlog = StepBacklog(asyncio.Queue()) if call.return_steps else None
    requests, queue = submit(engine, llm, prepared, backlog)  # errors (429, 503) before the stream starts

    formatter = LogprobFormatter(llm.tokenizer)

    async def events():
        trackers = [TextTracker(llm.tokenizer.decode, r.seq.params.stop) for r in requests]
        formatters = [StepFormatter(formatter.token_text, lambda r=r: r.seq.params.mode) for r in requests]
        streamed = [StreamedLogprobs(llm.tokenizer.decode) for _ in requests]
        echoed = [p.echo_text is None for p in prepared]
        finals: dict[int, Update] = {}

        def logprobs(index: int, update: Update, final: bool) -> dict | None:
            """The records of the tokens whose text has now been sent (all of them when final)."""
            if not call.logprobs:
                return None
            taken = streamed[index].take(update.token_ids, len(trackers[index].sent), final)
            records = [update.logprobs[j] for j in taken]
            if call.kind == "chat":
                return formatter.chat(records)
            ids = update.token_ids[:taken.stop]
            return formatter.completion(ids[taken.start:], records, len(prepared[index].echo_text or ""), ids)
        try:
            if call.kind == "chat":
                for i in range(len(requests)):
                    yield sse(_chunk(call, i, {"role": "assistant", "content": ""}))
            while len(finals) < len(requests):
                index, update = await queue.get()
                if isinstance(update, Step):
                    backlog.taken()
                    yield sse(step_chunk(call.head(chunk=True), formatters[index].step(index, update)))
                    continue
                if update.finish_reason in ("error", "abort"):
                    err = _failure(update)
                    yield sse(error_body(err.message, "server_error", None, err.code))
                    break
                if not echoed[index]:  # completions with echo: the prompt (and its logprobs) first
                    echoed[index] = True
                    prompt_logprobs = (formatter.completion(requests[index].seq.prompt_ids, update.prompt_logprobs)
                                       if call.logprobs else None)
                    yield sse(_chunk(call, index, prepared[index].echo_text, logprobs=prompt_logprobs))
                delta = trackers[index].advance(update)
                final = update.finish_reason is not None
                if delta:
                    content = {"content": delta} if call.kind == "chat" else delta
                    yield sse(_chunk(call, index, content, logprobs=logprobs(index, update, final)))
                if final:
                    finals[index] = update
                    chunk = _chunk(call, index, {} if call.kind == "chat" else "", update.finish_reason,
                                   update.token_ids if call.return_token_ids else None,  # all of them
                                   logprobs(index, update, final))
                    chunk["metrics"] = response_metrics(requests[index], update)
                    yield sse(chunk)
            else:
                if call.include_usage:
                    yield sse({**call.head(chunk=True), "choices": [], "usage": usage(requests, finals)})
            yield SSE_DONE
        finally:  # also runs when the client disconnects and the stream is cancelled
            _abort(engine, requests)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _chunk(call: Call, index: int, content, finish_reason: str | None = None,
           token_ids: list[int] | None = None, logprobs: dict | None = None) -> dict:
    choice = {"index": index, "finish_reason": finish_reason}
    if call.kind == "chat":
        choice.update(delta=content, logprobs=logprobs)
    else:
        choice.update(text=content, logprobs=logprobs)
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {**call.head(chunk=True), "choices": [choice]}
