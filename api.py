"""HTTP API for ChatGLM-6B: upstream's `POST /` and an OpenAI-compatible `/v1/chat/completions` (with streaming).

    python api.py [--model-path DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Every request goes to one chatglm.service.ModelService, whose engine generates all admitted replies together
(continuous batching). The event loop only reads bodies (size-limited) and relays text; parsing runs in a thread
pool and validation, history fitting and tokenizing on the service's thread, so /health answers while replies are
generated or a huge request is checked. A client that hangs up stops its reply at the next step.
"""
import argparse
import asyncio
import hmac
import itertools
import json
import logging
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Dict, List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from chatglm.context import ContextTooLongError
from chatglm.model_info import describe_model, public_model_info
from chatglm.options import add_model_args, add_server_args, kv_budget_bytes, load_from_args
from chatglm.service import ModelService, QueueFull, Reply, Result
from chatglm.text import History
from chatglm.validation import (MAX_HISTORY_TURNS, GenerationOptions, InputError, check_count, check_history,
                                check_text, parse_json_object)

log = logging.getLogger("chatglm.api")

DEFAULT_MAX_LENGTH = GenerationOptions.max_length  # POST /'s, capped at the model's context below
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


# ---- response bodies ------------------------------------------------------------------------------------------

class UpstreamResponse(BaseModel):
    """Reply of POST /, as upstream's api.py shaped it."""
    response: str
    history: List[List[str]]
    status: int = 200
    time: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, result: Result) -> "Usage":
        return cls(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                   total_tokens=result.prompt_tokens + result.completion_tokens)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Optional[str]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[str] = None

    @field_serializer("delta")
    def _only_what_is_set(self, delta: Delta) -> dict:
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    """One Server-Sent Event of a stream: a delta carries only what it sets; "usage" appears (null until the
    last chunk) only when the client asked for it."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChunkChoice]
    usage: Optional[Usage] = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    generating: bool  # replies are being generated
    queued: int       # requests waiting to be admitted


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "THUDM"
    chatglm: dict  # what is loaded (precision, quantization, P-Tuning prefix); OpenAI clients ignore it


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


# ---- requests -> (query, history, options) --------------------------------------------------------------------
# Run in a worker thread: parsing and the per-message text checks. Option values, history fitting and tokenizing
# are the model service's (on its own thread).

def checked_text(text, field: str) -> str:
    try:
        return check_text(text, field)
    except InputError as e:
        raise APIError(400, str(e), param=e.field) from None


def options_from(**given) -> GenerationOptions:
    try:
        return GenerationOptions.build(**given)  # the values are checked by the service, with the others
    except InputError as e:
        raise APIError(400, str(e), param=e.field) from None


def plan_upstream(raw: bytes, context: int):
    """(body, query, history, options) for a POST / body."""
    body = parse_body(raw, UpstreamRequest)
    checked_text(body.prompt, "prompt")
    try:
        history = check_history(body.history)
    except InputError as e:
        raise APIError(400, str(e), param="history") from None
    options = options_from(
        max_length=min(DEFAULT_MAX_LENGTH, context) if body.max_length is None else body.max_length,
        top_p=body.top_p, temperature=body.temperature, repetition_penalty=body.repetition_penalty,
        top_k=body.top_k, stop=body.stop)
    return body, body.prompt, history, options


def to_query_and_history(messages: List[Message]):
    """OpenAI messages -> (query, [(q, a), ...]). System messages are put in front of the first user message
    (ChatGLM-6B has no system role); consecutive messages of one role are joined by newlines."""
    for i, m in enumerate(messages):
        checked_text(m.text, f"messages[{i}].content")
    system = "\n".join(m.text for m in messages if m.role in ("system", "developer"))
    turns: List[List[str]] = []  # [role, text]
    for m in (m for m in messages if m.role not in ("system", "developer")):
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
    if not turns[-1][1].strip():
        raise APIError(400, "the last user message is empty", param="messages")
    return turns[-1][1], history


def plan_chat_completion(raw: bytes, context: int):
    """(body, query, history, options) for a /v1/chat/completions body."""
    body = parse_body(raw, ChatCompletionRequest)
    options = options_from(
        top_p=body.top_p, temperature=body.temperature, repetition_penalty=body.repetition_penalty,
        top_k=0 if body.top_k == -1 else body.top_k,  # -1 = no limit, as vLLM
        frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
        logit_bias=body.logit_bias, seed=body.seed, stop=body.stop,
        max_new_tokens=body.max_completion_tokens or body.max_tokens, max_length=context)
    query, history = to_query_and_history(body.messages)
    return body, query, history, options


# ---- relaying a reply -----------------------------------------------------------------------------------------

class ClientGone(Exception):
    pass


async def submitted(service: ModelService, query: str, history: History, options: GenerationOptions,
                    param: str) -> Reply:
    """The request queued and prepared (validated, fitted, tokenized) by the service, off the event loop; 503 with
    Retry-After when the queue is full, 400 for what the service refuses."""
    try:
        reply = service.submit(query, history, options)
    except QueueFull as e:
        raise APIError(503, str(e), headers={"Retry-After": str(e.retry_after)}) from None
    await run_in_threadpool(reply.prepared.wait)
    if isinstance(reply.error, ContextTooLongError):
        raise APIError(400, str(reply.error), param=param, code="context_length_exceeded")
    if isinstance(reply.error, InputError):
        raise APIError(400, str(reply.error), param=reply.error.field)
    return reply


async def deltas(reply: Reply, request: Request):
    """The reply's text deltas; ClientGone when the client hangs up first. Leaving early cancels the reply."""
    items, pending, checked = reply.__aiter__(), None, time.monotonic()
    try:
        while True:
            pending = pending or asyncio.ensure_future(items.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=0.25)
            if time.monotonic() - checked > 0.25:  # also while deltas keep coming
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise ClientGone()
            if not done:
                continue
            try:
                delta = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield delta
    finally:
        reply.cancel()  # a no-op once the reply has ended
        if pending is not None:
            pending.cancel()  # ends the iterator, which is inside that task now
        else:
            await items.aclose()


async def result_of(reply: Reply, request: Request) -> Result:
    try:
        async for _ in deltas(reply, request):
            pass
    except (ClientGone, InputError, ContextTooLongError):
        raise
    except Exception as e:  # a bug or out of memory on the engine thread: 500, the server keeps serving
        raise APIError(500, f"generation failed: {type(e).__name__}: {e}") from None
    return reply.result


def log_end(reply: Reply, label: str):
    """One log line per request once its reply has ended (cancelled ones too: the engine drops them next step)."""
    async def wait_and_log():
        while not reply.done:
            await asyncio.sleep(0.05)
        r = reply.result
        took = time.monotonic() - reply.submitted
        if r is None:
            return
        if r.finish_reason == "cancelled":
            log.info("%s: client disconnected; stopped after %d tokens (%.2f s)", label, r.completion_tokens, took)
        else:
            log.info("%s: %d prompt + %d completion tokens in %.2f s (%s)", label, r.prompt_tokens,
                     r.completion_tokens, took, r.finish_reason)
    asyncio.get_running_loop().create_task(wait_and_log())
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


def dropped_header(reply: Reply) -> dict:
    # the reply says when turns were left out of the prompt (the JSON body keeps upstream's exact shape)
    return {DROPPED_TURNS_HEADER: str(reply.dropped_turns)} if reply.dropped_turns else {}


class ChatAPI:
    """The route handlers, over one model service."""

    def __init__(self, service: ModelService, served_name: str, max_body_bytes: int):
        self.service, self.served_name, self.max_body_bytes = service, served_name, max_body_bytes
        self.context = int(service.model.config.max_sequence_length)
        self.started = int(time.time())
        self.request_ids = itertools.count(1)

    async def health(self) -> Health:
        return Health(model=self.served_name, generating=self.service.running > 0, queued=self.service.waiting)

    async def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.served_name, created=self.started,
                                         chatglm=public_model_info(self.service.model))])

    async def upstream_chat(self, request: Request):
        """Upstream's API: {"prompt", "history", "max_length", "top_p", "temperature"} -> {"response", "history",
        "status": 200, "time"}. Explicit values are used as given (upstream replaced 0 by the default); optional
        "repetition_penalty", "top_k" and "stop" as in model.chat."""
        raw = await read_body(request, self.max_body_bytes)
        body, query, history, options = await run_in_threadpool(plan_upstream, raw, self.context)
        reply = await submitted(self.service, query, history, options, "prompt")
        log_end(reply, f"#{next(self.request_ids)} POST /")
        try:
            result = await result_of(reply, request)
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody is listening
        # the caller's whole history comes back, even turns left out of this prompt
        out = UpstreamResponse(response=result.response, history=[list(turn) for turn in history] +
                               [[query, result.response]], time=datetime.now().strftime("%Y-%m-%d %H:%M:%S"))
        return JSONResponse(out.model_dump(), headers=dropped_header(reply))

    async def chat_completions(self, request: Request):
        raw = await read_body(request, self.max_body_bytes)
        body, query, history, options = await run_in_threadpool(plan_chat_completion, raw, self.context)
        reply = await submitted(self.service, query, history, options, "messages")
        log_end(reply, f"#{next(self.request_ids)} /v1/chat/completions" + (" stream" if body.stream else ""))
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self.events(reply, request, completion_id, created, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              **dropped_header(reply)})
        try:
            result = await result_of(reply, request)
        except ClientGone:
            return JSONResponse({}, status_code=499)
        out = ChatCompletion(id=completion_id, created=created, model=self.served_name, usage=Usage.of(result),
                             choices=[Choice(message=AssistantMessage(content=result.response),
                                             finish_reason=result.finish_reason)])
        return JSONResponse(out.model_dump(), headers=dropped_header(reply))

    async def events(self, reply: Reply, request: Request, completion_id: str, created: int, include_usage: bool):
        """The Server-Sent Events of a streamed completion: a role chunk, content chunks, the finish_reason chunk,
        the usage chunk when asked for, [DONE]."""
        def chunk(choices, usage: Optional[Usage] = None) -> str:
            c = ChatCompletionChunk(id=completion_id, created=created, model=self.served_name, choices=choices,
                                    usage=usage)
            return f"data: {c.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"

        try:
            yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""), finish_reason=None)])
            async for text in deltas(reply, request):
                yield chunk([ChunkChoice(delta=Delta(content=text), finish_reason=None)])
            yield chunk([ChunkChoice(delta=Delta(), finish_reason=reply.result.finish_reason)])
            if include_usage:
                yield chunk([], usage=Usage.of(reply.result))
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass
        except Exception as e:  # after the first byte the status is sent: the error goes in the stream
            yield f"data: {_json(error_body(f'generation failed: {type(e).__name__}: {e}', 500))}\n\n"
            yield "data: [DONE]\n\n"


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def _api_error(request, e: APIError):
    return JSONResponse(error_body(e.message, e.status, e.param, e.code), status_code=e.status, headers=e.headers)


async def _http_error(request, e: StarletteHTTPException):
    return JSONResponse(error_body(str(e.detail), e.status_code), status_code=e.status_code,
                        headers=getattr(e, "headers", None))


def served_model_name(model, model_name: Optional[str] = None) -> str:
    return model_name or ("chatglm-demo" if getattr(model, "is_demo", False) else
                          os.path.basename(str(model.name_or_path).rstrip("/\\")) or "chatglm-6b")


def create_app(service: ModelService, *, api_key: Optional[str] = None, model_name: Optional[str] = None,
               allowed_hosts: Optional[List[str]] = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The routes over `service` (closed when the app shuts down). allowed_hosts: the Host header values served
    (None: any); others get 400, which stops DNS rebinding (a web page whose name resolves to 127.0.0.1 reaching
    this keyless local server)."""
    api = ChatAPI(service, served_model_name(service.model, model_name), max_body_bytes)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()  # Ctrl-C: every open reply ends, cancelled

    app = FastAPI(title="ChatGLM-6B API", lifespan=lifespan)
    app.state.api = api
    if api_key:
        app.add_middleware(RequireAPIKey, key=api_key)
    if allowed_hosts is not None:  # added last, so it runs first
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts, www_redirect=False)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/", api.upstream_chat, methods=["POST"])
    app.add_api_route("/v1/models", api.list_models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
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
    service = ModelService(model, tokenizer, max_queue=args.max_queue, kv_budget=kv_budget_bytes(args))
    app = create_app(service, api_key=args.api_key, model_name=args.model_name, allowed_hosts=allowed,
                     max_body_bytes=args.max_body_bytes)

    import uvicorn
    log.info("ChatGLM-6B API on http://%s:%d (POST /, /v1/chat/completions, /v1/models, /health); %s",
             args.host, args.port, describe_model(model))
    log.info("%s", service.describe())
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
