"""HTTP API for ChatGLM-6B: upstream's `POST /` and an OpenAI-compatible `/v1/chat/completions` (with streaming).

    python api.py [--model-path DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

One worker thread owns the model and runs one generation at a time, in arrival order; the event loop only reads
bodies (size-limited) and relays, while parsing, validation and tokenizing run in a thread pool, so /health answers
while a long reply is generated or a huge request is checked. A client that hangs up (or a streaming client that
closes the connection) stops its generation at the next token.
"""
import argparse
import asyncio
import hmac
import itertools
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Dict, List, Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from chatglm.context import ContextTooLongError, fit_history, prompt_length
from chatglm.model_info import describe_model, public_model_info
from chatglm.options import add_model_args, add_server_args, load_from_args
from chatglm.validation import (MAX_HISTORY_TURNS, GenerationOptions, InputError, check_count, check_history,
                                check_text, parse_json_object)
from utils import TextDeltas

log = logging.getLogger("chatglm.api")

# upstream api.py's default max_length for POST / (the sampling defaults are GenerationOptions')
DEFAULT_MAX_LENGTH = 2048
MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~250 times the text of a full 2048-token prompt
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} (OpenAI's shape) on every route."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(message: str, status: int, param=None, code=None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large", 503: "server_busy"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- request bodies -------------------------------------------------------------------------------------------
# strict: a string where a number belongs (or 1 where a bool belongs) is an error, not silently converted. The
# models check shapes and types; values (ranges, text the tokenizer can encode) are chatglm.validation's.


class UpstreamRequest(BaseModel):
    """Body of POST / (upstream api.py, plus repetition_penalty, top_k and stop). Unknown fields are ignored, as
    upstream did."""
    model_config = ConfigDict(strict=True)
    prompt: str
    history: Optional[List[List[str]]] = None
    max_length: Optional[int] = None
    top_p: Optional[float] = None
    temperature: Optional[float] = None
    repetition_penalty: Optional[float] = None
    top_k: Optional[int] = None
    stop: Union[str, List[str], None] = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v):
        if not v.strip():
            raise ValueError("prompt is empty")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[TextPart]]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Body of POST /v1/chat/completions: the OpenAI fields ChatGLM-6B can honour; others are ignored."""
    model_config = ConfigDict(strict=True)
    model: Optional[str] = None  # any name is accepted (clients often send gpt-3.5-turbo); the reply names ours
    messages: List[Message] = Field(min_length=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)  # OpenAI's range (generation takes up to 100)
    top_p: Optional[float] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, List[str], None] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    # extensions, as vLLM's server takes them (top_k -1 = no limit, as there)
    repetition_penalty: Optional[float] = None
    top_k: Optional[int] = None
    n: Optional[int] = 1
    seed: Optional[int] = None
    logit_bias: Optional[Dict[str, Union[int, float]]] = None
    tools: Optional[list] = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("stop takes at most 4 strings")  # OpenAI's limit
        return v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v not in (None, 1):
            raise ValueError(f"only n=1 is supported (got n={v})")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools / function calling is not supported by ChatGLM-6B")
        return v


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False):
        where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where and not msg.startswith(where) else msg)
    return "; ".join(parts)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body of a POST: JSON content type required (a web page's form post, text/plain included, cannot
    drive the model), at most max_bytes (413 otherwise; a longer body is read to its end and dropped, so the
    client gets the answer instead of a reset connection). Parsing and checks happen off the event loop."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (ctype == "application/json" or ctype.endswith("+json")):
        raise APIError(415, f"send the body as JSON with 'Content-Type: application/json' (got {ctype or 'none'!r})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= max_bytes:
            chunks.append(chunk)
        elif size > 64 * max_bytes:
            break  # not worth reading further: the client may see a reset connection
    if size > max_bytes:
        raise APIError(413, f"request body is {size} bytes; at most {max_bytes} are accepted (--max-body-bytes)")
    return b"".join(chunks)


# the most entries a body's conversation list may hold: counted before each entry is validated
MOST_ENTRIES = {"history": MAX_HISTORY_TURNS, "messages": 2 * MAX_HISTORY_TURNS + 1}


def parse_body(raw: bytes, model: type):
    """The body validated as `model`, or APIError(400) naming what is wrong. Runs in a worker thread."""
    try:
        data = parse_json_object(raw)
        for name, most in MOST_ENTRIES.items():
            check_count(data.get(name), name, most)
    except InputError as e:
        raise APIError(400, str(e), param=e.field) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]["loc"]
        raise APIError(400, _describe(e), param=str(first[0]) if first else None) from None


# ---- the model worker -----------------------------------------------------------------------------------------

@dataclass
class Job:
    """One generation request, as the worker thread sees it."""
    id: int
    route: str
    query: str
    history: list
    max_length: int
    top_p: float
    temperature: float
    prompt_tokens: int
    stream: bool = False
    stop: List[str] = field(default_factory=list)
    seed: Optional[int] = None
    logit_bias: Optional[Dict[int, float]] = None
    penalties: Optional[Dict[str, float]] = None  # OpenAI's frequency_penalty / presence_penalty
    options: dict = field(default_factory=dict)  # more stream_chat arguments: repetition_penalty, top_k, stop
    # set by submit()
    loop: Optional[asyncio.AbstractEventLoop] = None
    events: Optional[asyncio.Queue] = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, payload=None):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()


@dataclass
class Result:
    response: str
    history: list
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length | cancelled


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: adds a fixed value to the scores of the given token ids (-100 bans a token)."""

    def __init__(self, bias: Dict[int, float]):
        self.ids = torch.tensor(list(bias.keys()))
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids, scores):
        scores[:, self.ids.to(scores.device)] += self.values.to(scores.device, scores.dtype)
        return scores


class FrequencyPresencePenalty(LogitsProcessor):
    """OpenAI's frequency_penalty and presence_penalty on the raw scores: a token generated c times so far in this
    reply loses c * frequency_penalty + (c > 0) * presence_penalty (the prompt does not count, as in OpenAI's
    definition and vLLM's implementation)."""

    def __init__(self, prompt_tokens: int, frequency_penalty: float = 0.0, presence_penalty: float = 0.0):
        self.start, self.frequency, self.presence = prompt_tokens, frequency_penalty, presence_penalty

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.start:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class SeenIds(StoppingCriteria):
    """Never stops generation, but remembers the ids so far: the exact completion token count, and whether the
    reply ended with <eop> (finish_reason stop) or ran out of length."""
    ids = None

    def __call__(self, input_ids, scores, **kwargs):
        self.ids = input_ids
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _find_stop(text: str, stops: List[str]) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _without_stop_prefix(text: str, stops: List[str]) -> str:
    """text minus a tail that could still grow into a stop string (never stream half a stop sequence)."""
    for n in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops if len(s) > n):
            return text[:-n]
    return text


class ModelWorker:
    """The only thread that touches the model: runs queued jobs one at a time, in arrival order."""

    def __init__(self, tokenizer, model, max_queue: int):
        self.tokenizer, self.model, self.max_queue = tokenizer, model, max_queue
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.current: Optional[Job] = None
        self.thread = threading.Thread(target=self._run, name="chatglm-model", daemon=True)
        self.thread.start()

    @property
    def queued(self) -> int:
        return self.jobs.qsize()

    def submit(self, job: Job) -> Job:
        if self.queued >= self.max_queue:
            raise APIError(503, f"server busy: {self.queued} requests are already waiting; retry later",
                           headers={"Retry-After": "5"})
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        self.jobs.put(job)
        return job

    def stop(self):
        if self.current is not None:
            self.current.cancelled.set()
        self.jobs.put(None)

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                log.info("#%d %s: client left before its turn; skipped", job.id, job.route)
                continue
            self.current = job
            try:
                job.emit("done", self._generate(job))
            except Exception as e:  # a bug or an out-of-memory error: answer 500, keep serving
                log.exception("#%d %s failed", job.id, job.route)
                job.emit("error", e)
            finally:
                self.current = None
                if job.seed is not None:
                    torch.seed()  # the next request without a seed must not replay this one's randomness
                if self.model.device.type == "cuda":
                    torch.cuda.empty_cache()  # as upstream: give memory back between requests

    def _generate(self, job: Job) -> Result:
        seen = SeenIds()
        processors = LogitsProcessorList()
        if job.penalties:
            processors.append(FrequencyPresencePenalty(job.prompt_tokens, **job.penalties))
        if job.logit_bias:
            processors.append(LogitBias(job.logit_bias))
        if job.seed is not None:
            torch.manual_seed(job.seed)  # reproducible: only this thread samples
        deltas, finish, response = TextDeltas(), None, ""
        start = time.perf_counter()
        gen = self.model.stream_chat(self.tokenizer, job.query, job.history, max_length=job.max_length,
                                     top_p=job.top_p, temperature=job.temperature, logits_processor=processors,
                                     stopping_criteria=StoppingCriteriaList([seen]), **job.options)
        try:
            for response, _ in gen:
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                cut = _find_stop(response, job.stop)
                if cut is not None:
                    response, finish = response[:cut], "stop"
                    break
                if job.stream:
                    new = deltas.step(_without_stop_prefix(response, job.stop) if job.stop else response)
                    if new:
                        job.emit("delta", new)
        finally:
            gen.close()  # stops the decoding loop at once
        generated = seen.ids[0, job.prompt_tokens:].tolist() if seen.ids is not None else []
        if finish is None:
            finish = "stop" if generated and generated[-1] == self.tokenizer.eos_token_id else "length"
        if job.stream and finish != "cancelled":
            rest = deltas.finish(response)
            if rest:
                job.emit("delta", rest)
        took = time.perf_counter() - start
        if finish == "cancelled":
            log.info("#%d %s: client disconnected; stopped after %d tokens (%.2f s)", job.id, job.route,
                     len(generated), took)
        else:
            log.info("#%d %s: %d prompt + %d completion tokens in %.2f s (%s)", job.id, job.route,
                     job.prompt_tokens, len(generated), took, finish)
        return Result(response, job.history + [(job.query, response)], job.prompt_tokens, len(generated), finish)


class ClientGone(Exception):
    pass


async def job_events(job: Job, request: Request):
    """The worker's events for `job`, ending with done/error; ClientGone when the client hangs up first."""
    last_check = time.monotonic()
    while True:
        try:
            item = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            item = None
        if item is None or time.monotonic() - last_check > 0.25:
            last_check = time.monotonic()
            if await request.is_disconnected():
                raise ClientGone()
        if item is not None:
            yield item
            if item[0] in ("done", "error"):
                return


async def wait_result(job: Job, request: Request) -> Result:
    try:
        async for kind, payload in job_events(job, request):
            if kind == "done":
                return payload
            if kind == "error":
                raise APIError(500, f"generation failed: {type(payload).__name__}: {payload}")
    finally:
        job.cancelled.set()  # no-op when finished; stops the generation if the client left or we were cancelled


# ---- API key --------------------------------------------------------------------------------------------------

class RequireAPIKey:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <key>` (what the openai client
    sends). Plain ASGI, not BaseHTTPMiddleware, so streaming and disconnect detection are untouched.
    GET /health without the key answers only {"status": "ok"} (a liveness probe needs no secret and learns nothing)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                if scope["path"] == "/health" and scope["method"] in ("GET", "HEAD"):
                    await JSONResponse({"status": "ok"})(scope, receive, send)
                    return
                msg = ("missing API key: send 'Authorization: Bearer <key>'" if not given else "wrong API key")
                response = JSONResponse(error_body(msg, 401, code="invalid_api_key"), status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- the app --------------------------------------------------------------------------------------------------

DROPPED_TURNS_HEADER = "X-ChatGLM-Dropped-Turns"


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def create_app(tokenizer, model, *, api_key: Optional[str] = None, model_name: Optional[str] = None,
               max_queue: int = 64, allowed_hosts: Optional[List[str]] = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """allowed_hosts: the Host header values served (None: any); others get 400, which stops DNS rebinding (a web
    page whose name resolves to 127.0.0.1 reaching this keyless local server)."""
    context = int(model.config.max_sequence_length)
    served_name = model_name or ("chatglm-demo" if getattr(model, "is_demo", False) else
                                 os.path.basename(str(model.name_or_path).rstrip("/\\")) or "chatglm-6b")
    started = int(time.time())
    request_ids = itertools.count(1)
    worker = ModelWorker(tokenizer, model, max_queue)

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = FastAPI(title="ChatGLM-6B API", lifespan=lifespan)
    app.state.worker = worker
    if api_key:
        app.add_middleware(RequireAPIKey, key=api_key)
    if allowed_hosts is not None:  # added last, so it runs first
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts, www_redirect=False)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(error_body(e.message, e.status, e.param, e.code), status_code=e.status,
                            headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), e.status_code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    def fit(query: str, history: list, max_length: int, param: str):
        """(history the model sees, dropped turn count, prompt tokens): the oldest turns go when the conversation
        would not leave room for a reply; a question that alone does not fit is a 400."""
        try:
            kept, dropped = fit_history(tokenizer, query, history, max_length, context)
        except ContextTooLongError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        return kept, dropped, prompt_length(tokenizer, query, kept)

    def checked(**given) -> GenerationOptions:
        """The generation options of a request, validated by the one set of rules every front door uses."""
        try:
            return GenerationOptions.build(**given).validate(model.config)
        except InputError as e:
            raise APIError(400, str(e), param=e.field) from None

    def checked_text(text, field: str) -> str:
        try:
            return check_text(text, field)
        except InputError as e:
            raise APIError(400, str(e), param=e.field) from None

    def dropped_header(dropped: int) -> dict:
        # the reply says when turns were left out of the prompt (the JSON body keeps upstream's exact shape)
        return {DROPPED_TURNS_HEADER: str(dropped)} if dropped else {}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served_name, "generating": worker.current is not None,
                "queued": worker.queued}

    def plan_upstream(raw: bytes):
        """(body, the caller's history, Job, dropped turns) for a POST / body; every check and all tokenizing
        (history fitting too) happen here, in a worker thread, so a huge request never stalls other clients."""
        body = parse_body(raw, UpstreamRequest)
        checked_text(body.prompt, "prompt")
        try:
            history = check_history(body.history)
        except InputError as e:
            raise APIError(400, str(e), param="history") from None
        o = checked(max_length=min(DEFAULT_MAX_LENGTH, context) if body.max_length is None else body.max_length,
                    top_p=body.top_p, temperature=body.temperature, repetition_penalty=body.repetition_penalty,
                    top_k=body.top_k, stop=body.stop)
        # only the options that were given go to stream_chat (its own defaults are the same values)
        options = {name: getattr(o, name) for name in ("repetition_penalty", "top_k")
                   if getattr(body, name) is not None}
        if o.stop:
            options["stop"] = list(o.stop)
        kept, dropped, prompt_tokens = fit(body.prompt, history, o.max_length, "prompt")
        job = Job(next(request_ids), "POST /", body.prompt, kept, o.max_length, o.top_p, o.temperature,
                  prompt_tokens, options=options)
        return body, history, job, dropped

    @app.post("/")
    async def upstream_chat(request: Request):
        """Upstream's API: {"prompt", "history", "max_length", "top_p", "temperature"} -> {"response", "history",
        "status": 200, "time"}. Explicit values are used as given (upstream replaced 0 by the default). Optional
        "repetition_penalty", "top_k" and "stop" go to stream_chat as they are (the reply is model.chat's)."""
        raw = await read_body(request, max_body_bytes)
        body, history, job, dropped = await run_in_threadpool(plan_upstream, raw)
        job = worker.submit(job)
        try:
            result = await wait_result(job, request)
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody is listening
        # the caller's whole history comes back, even turns left out of this prompt
        history_out = [list(pair) for pair in history] + [[body.prompt, result.response]]
        return JSONResponse({"response": result.response, "history": history_out, "status": 200,
                             "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S")}, headers=dropped_header(dropped))

    @app.get("/v1/models")
    async def list_models():
        # "chatglm": what is loaded (precision, quantization, P-Tuning prefix); OpenAI clients ignore the extra key
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": started,
                                            "owned_by": "THUDM", "chatglm": public_model_info(model)}]}

    def to_query_and_history(messages: List[Message]):
        """OpenAI messages -> (query, [(q, a), ...]). System messages are put in front of the first user message
        (ChatGLM-6B has no system role); consecutive messages of one role are joined by newlines."""
        for i, m in enumerate(messages):
            checked_text(m.text, f"messages[{i}].content")
        system = "\n".join(m.text for m in messages if m.role in ("system", "developer"))
        turns: List[List[str]] = []  # [role, text]
        for m in messages:
            if m.role in ("system", "developer"):
                continue
            if turns and turns[-1][0] == m.role:
                turns[-1][1] += "\n" + m.text
            else:
                turns.append([m.role, m.text])
        if not turns or turns[-1][0] != "user":
            raise APIError(400, "the last message must have role 'user' (the question to answer)", param="messages")
        if turns[0][0] != "user":
            raise APIError(400, "the conversation must start with a 'user' message (after any system messages)",
                           param="messages")
        if system:
            turns[0][1] = system + "\n" + turns[0][1]
        history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
        query = turns[-1][1]
        if not query.strip():
            raise APIError(400, "the last user message is empty", param="messages")
        return query, history

    def plan_chat_completion(raw: bytes):
        """(body, Job, dropped turns) for a /v1/chat/completions body; checks and tokenizing in a worker thread."""
        body = parse_body(raw, ChatCompletionRequest)
        o = checked(top_p=body.top_p, temperature=body.temperature, repetition_penalty=body.repetition_penalty,
                    top_k=0 if body.top_k == -1 else body.top_k,  # -1 = no limit, as vLLM
                    frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                    logit_bias=body.logit_bias, seed=body.seed, stop=body.stop,
                    max_new_tokens=body.max_completion_tokens or body.max_tokens, max_length=context)
        options = {name: getattr(o, name) for name in ("repetition_penalty", "top_k")
                   if getattr(body, name) is not None}
        penalties = {name: getattr(o, name) for name in ("frequency_penalty", "presence_penalty") if getattr(o, name)}
        query, history = to_query_and_history(body.messages)
        history, dropped, prompt_tokens = fit(query, history, context, "messages")
        job = Job(
            next(request_ids), "/v1/chat/completions" + (" stream" if body.stream else ""), query, history,
            min(context, prompt_tokens + o.max_new_tokens) if o.max_new_tokens else context, o.top_p, o.temperature,
            prompt_tokens, stream=bool(body.stream), stop=list(o.stop), seed=o.seed,
            logit_bias=dict(o.logit_bias) or None, penalties=penalties or None, options=options)
        return body, job, dropped

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_body(request, max_body_bytes)
        body, job, dropped = await run_in_threadpool(plan_chat_completion, raw)
        job = worker.submit(job)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(r: Result) -> dict:
            return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                    "total_tokens": r.prompt_tokens + r.completion_tokens}

        if not body.stream:
            try:
                result = await wait_result(job, request)
            except ClientGone:
                return JSONResponse({}, status_code=499)
            return JSONResponse({"id": completion_id, "object": "chat.completion", "created": created,
                                 "model": served_name,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": result.response},
                                              "finish_reason": result.finish_reason}],
                                 "usage": usage(result)}, headers=dropped_header(dropped))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict, finish_reason=None, **extra) -> str:
            obj = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": served_name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
            if include_usage and "usage" not in extra:
                obj["usage"] = None
            return f"data: {_json(obj)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for kind, payload in job_events(job, request):
                    if kind == "delta":
                        yield chunk({"content": payload})
                    elif kind == "done":
                        yield chunk({}, payload.finish_reason)
                        if include_usage:
                            obj = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": served_name, "choices": [], "usage": usage(payload)}
                            yield f"data: {_json(obj)}\n\n"
                    elif kind == "error":
                        yield f"data: {_json(error_body(f'generation failed: {payload}', 500))}\n\n"
                yield "data: [DONE]\n\n"
            except ClientGone:
                pass
            finally:
                job.cancelled.set()  # the client closed the stream (or the server is stopping): stop generating

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          **dropped_header(dropped)})

    return app


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="ChatGLM-6B over HTTP: upstream's POST / and OpenAI-compatible /v1/chat/completions.")
    add_model_args(parser)
    add_server_args(parser, port=8000)
    g = parser.add_argument_group("api")
    g.add_argument("--api-key", default=os.environ.get("CHATGLM_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every request (default: $CHATGLM_API_KEY; none)")
    g.add_argument("--model-name", default=None,
                   help="model id reported by /v1/models and in replies (default: the model folder's name)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="requests allowed to wait for the model before new ones get 503 (default 64)")
    g.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated Host header names to serve, e.g. api.example.com (a '*.' prefix matches "
                        "subdomains; '*' = any). Others get 400, which blocks DNS rebinding. Default: "
                        f"{','.join(LOOPBACK_HOSTS)} when bound to a loopback address, else any")
    g.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help=f"largest request body accepted; larger ones get 413 (default {MAX_BODY_BYTES})")
    args = parser.parse_args(argv)
    if args.max_body_bytes < 1:
        parser.error("argument --max-body-bytes: must be a positive number of bytes")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from chatglm import ModelLoadError
    try:
        tokenizer, model = load_from_args(args)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loopback = args.host in LOOPBACK_HOSTS or args.host.startswith("127.")
    if not loopback and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach port %d can use the model",
                    args.host, args.port)
    if args.allowed_hosts:
        allowed = [name.strip() for name in args.allowed_hosts.split(",") if name.strip()]
    else:
        allowed = sorted({*LOOPBACK_HOSTS, "[::1]", args.host}) if loopback else None
    app = create_app(tokenizer, model, api_key=args.api_key, model_name=args.model_name, max_queue=args.max_queue,
                     allowed_hosts=allowed, max_body_bytes=args.max_body_bytes)

    import uvicorn
    log.info("ChatGLM-6B API on http://%s:%d (POST /, /v1/chat/completions, /v1/models, /health); %s",
             args.host, args.port, describe_model(model))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
