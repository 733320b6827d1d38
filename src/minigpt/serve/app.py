"""The HTTP API: OpenAI's chat and text completions (streamed or not, with logprobs), models,
vLLM's tokenizer endpoints, health, metrics and the chat page, over one `Scheduler` that owns
the model.

Every request is checked before it reaches the engine: malformed JSON, wrong fields, caps on
messages and characters, prompts that do not fit the context, a full queue, an unknown model or
a missing API key each get their status and OpenAI's error JSON. A client that goes away stops
its generation and frees its rows.

`create_app` only assembles: the scheduler, metrics, tokenizer and `Settings` go on `app.state`,
and the routes (`site`: page, health, metrics; `api`: /v1 behind the key) are module-level
functions that read them through `request.app.state`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from minigpt.engine import Engine, EngineError, Sampling
from minigpt.errors import MinigptError
from minigpt.serve.guard import Guard, page_policy
from minigpt.serve.logprobs import LegacyLogprobs, chat_entry, token_name
from minigpt.serve.metrics import Metrics, endpoint_label
from minigpt.serve.openapi import errors, install, json_body
from minigpt.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationParams,
    TokenizeRequest,
    parse,
)
from minigpt.serve.scheduler import Event, Job, QueueFull, Scheduler
from minigpt.serve.text import TextStream
from minigpt.serve.tokenize import tokenizer_info
from minigpt.tokenizer import ConversationError, Tokenizer, get_tokenizer

log = logging.getLogger("minigpt.serve")


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may send (nanochat's defaults)."""

    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000

    @property
    def max_body(self) -> int:
        """Bytes of request body read before a 413: JSON may escape a character as 6 bytes."""
        return 8 * self.max_total_chars + 65536


@dataclass(frozen=True)
class Settings:
    """What the routes need besides the scheduler, on `app.state.settings`."""

    model_name: str
    api_keys: tuple[str, ...]  # any of them opens /v1; none: /v1 is open
    limits: Limits
    page: str  # the chat page's HTML
    chat_model: bool | None = None  # fine-tuned for chat; False: a base model; None: unknown
    request_timeout: float = 600.0  # seconds a generation may take before it is cancelled


class ClientGone(Exception):
    """The client disconnected while its request was generating."""


def create_app(
    load: Callable[[], Engine],
    model_name: str,
    *,
    max_batch: int = 16,
    max_queue: int = 64,
    max_prefill_tokens: int | None = 512,
    api_keys: tuple[str, ...] = (),
    cors_origins: tuple[str, ...] = (),
    limits: Limits = Limits(),
    chat_model: bool | None = None,
    allowed_hosts: tuple[str, ...] | None = None,
    body_timeout: float = 30.0,
    request_timeout: float = 600.0,
) -> FastAPI:
    """The server's ASGI app. `load` builds the engine on the scheduler's thread when the app
    starts; until it returns, /health and the API answer 503. max_prefill_tokens: prompt tokens
    prefilled per engine step, between decode steps (None: every waiting prompt at once). chat_model (False: a base model,
    None: unknown) is shown in /v1/models and, when False, as a notice on the chat page.
    allowed_hosts: the Host headers answered (None: any); body_timeout: seconds to read a
    request body (408 after); request_timeout: seconds a generation may run (504 after)."""
    for key in api_keys:
        check_api_key(key)
    metrics = Metrics()
    app = FastAPI(title="minigpt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.state.scheduler = Scheduler(load, max_batch, max_queue, metrics, max_prefill_tokens)
    app.state.tokenizer = get_tokenizer()
    page = (resources.files("minigpt.serve") / "static" / "index.html").read_text("utf-8")
    app.state.settings = Settings(
        model_name, tuple(api_keys), limits, page, chat_model, request_timeout
    )
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
    app.add_middleware(  # outermost: a refused Host gets no further
        Guard,
        allowed_hosts=allowed_hosts,
        body_timeout=body_timeout,
        page_headers={"Content-Security-Policy": page_policy(page), "X-Frame-Options": "DENY"},
    )
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)
    app.include_router(site)
    app.include_router(api)
    body_caps = {  # the document states the caps that JSON Schema can
        "n": {"maximum": max_batch},
        "prompt": {"maxLength": limits.max_total_chars},
        "messages": {"maxItems": limits.max_messages},
    }
    install(app, api_keys=bool(api_keys), body_caps=body_caps)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.scheduler.start()
    yield
    app.state.scheduler.stop()


# ------------------------------------------------------------------------------------- errors
def count(request: Request, status: int) -> None:
    endpoint = endpoint_label(request.scope.get("route"))
    request.app.state.metrics.requests.labels(endpoint, str(status)).inc()


async def api_error(request: Request, e: APIError) -> JSONResponse:
    count(request, e.status)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    error = APIError(e.status_code, str(e.detail), code=str(e.status_code), headers=e.headers)
    return await api_error(request, error)


async def crash(request: Request, e: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    error = APIError(500, "internal error; see the server log", type="server_error")
    return await api_error(request, error)


# ------------------------------------------------------------------------------- dependencies
def check_api_key(api_key: str) -> None:
    """An API key must be sendable as a header: visible ASCII, no spaces."""
    if not api_key or not all("!" <= c <= "~" for c in api_key):
        raise MinigptError(
            "--api-key must be visible ASCII characters (no spaces, no accents): clients send it "
            "in the 'Authorization: Bearer KEY' header, which carries nothing else"
        )


def authorize(request: Request) -> None:
    api_keys = request.app.state.settings.api_keys
    if not api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # as bytes: headers are latin-1, and compare_digest refuses str that is not ASCII; compared
    # with every key, so the time taken does not tell which one nearly matched
    given = token.strip().encode("latin-1")
    matches = [hmac.compare_digest(given, key.encode("ascii")) for key in api_keys]
    if scheme.lower() != "bearer" or not any(matches):
        raise APIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
            code="invalid_api_key",
        )


def ready_engine(scheduler: Scheduler) -> Engine:
    if scheduler.load_error:
        raise APIError(
            503, f"the model failed to load: {scheduler.load_error}", type="server_error"
        )
    if not scheduler.ready.is_set():
        raise APIError(
            503, "the model is still loading", type="server_error", headers={"Retry-After": "5"}
        )
    return scheduler.engine


def model_card(settings: Settings) -> dict:
    """OpenAI's model object, plus `chat_model`: whether the model was fine-tuned for chat."""
    card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "minigpt"}
    return {**card, "chat_model": settings.chat_model}


def check_model(name: str | None, model_name: str) -> None:
    if name is not None and name != model_name:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {model_name!r}",
            param="model",
            code="model_not_found",
        )


# ---------------------------------------------------------------------------- request checks
async def read_json(request: Request, max_body: int):
    """The body as JSON. Only a JSON content type is read: a cross-site form, which a browser
    sends without asking first, never reaches the model (415)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(
            415,
            f"Content-Type {kind or '(none)'!r}: send 'Content-Type: application/json'",
            code="unsupported_media_type",
        )
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise APIError(413, f"the request body is over {max_body} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # thousands of nested [ or {: refused, not a crash
        raise APIError(400, "the request body's JSON is nested too deeply") from None


def check_messages(messages: list[dict[str, str]], limits: Limits) -> None:
    if len(messages) > limits.max_messages:
        raise APIError(
            400,
            f"{len(messages)} messages; the limit is {limits.max_messages} per request",
            param="messages",
        )
    for i, m in enumerate(messages):
        if len(m["content"]) > limits.max_message_chars:
            raise APIError(
                400,
                f"message {i} has {len(m['content'])} characters; the limit is "
                f"{limits.max_message_chars} per message",
                param=f"messages.{i}.content",
            )
    total = sum(len(m["content"]) for m in messages)
    if total > limits.max_total_chars:
        raise APIError(
            400,
            f"the messages have {total} characters; the limit is {limits.max_total_chars} in all",
            param="messages",
        )


def prompt_ids(
    prompts: list[str | list[int]], tokenizer: Tokenizer, limits: Limits, n_vocab: int
) -> list[list[int]]:
    """Each prompt as token ids: text is encoded (an empty one starts from <|endoftext|>, as
    GPT-2's unconditional samples do), ids are checked against the vocabulary."""
    chars = sum(len(p) for p in prompts if isinstance(p, str))
    if chars > limits.max_total_chars:
        raise APIError(
            400,
            f"prompt has {chars} characters; the limit is {limits.max_total_chars}",
            param="prompt",
        )
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids.append(tokenizer.encode(prompt) or [tokenizer.eot_id])
        elif not prompt:
            raise APIError(400, "prompt: a token-id prompt must not be empty", param="prompt")
        elif not all(0 <= t < n_vocab for t in prompt):
            raise APIError(400, f"prompt: token ids must be in 0..{n_vocab - 1}", param="prompt")
        else:
            ids.append(list(prompt))
    if not ids:
        raise APIError(400, "prompt: an empty list of prompts", param="prompt")
    return ids


def token_budget(prompt: list[int], req: GenerationParams, block: int, chat: bool) -> int:
    """The tokens to generate: max_tokens, or up to the end of the context; the prompt and
    that many more must fit in the model's `block` tokens."""
    if len(prompt) >= block:
        raise APIError(
            400,
            f"the prompt has {len(prompt)} tokens; this model's context is {block} tokens, "
            f"so it must be shorter",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    max_tokens = req.token_limit() or block - len(prompt)
    if len(prompt) + max_tokens > block:
        raise APIError(
            400,
            f"this model's context is {block} tokens; the prompt has {len(prompt)} tokens "
            f"and max_tokens asks for {max_tokens} more ({len(prompt) + max_tokens} in all). "
            f"Lower max_tokens or shorten the prompt.",
            param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def chat_stop_ids(tokenizer: Tokenizer) -> frozenset[int]:
    return frozenset(
        {tokenizer.eot_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id}
    )


# ------------------------------------------------------------------------------------- routes
site = APIRouter()  # the chat page, health and metrics: open to everyone
# /v1: behind the API key, if one is set
api = APIRouter(dependencies=[Depends(authorize)], responses=errors(401))


@site.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.settings.page)


HEALTH = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"enum": ["ok", "loading", "error"]},
        "model": {"type": "string"},
        "error": {"type": "string"},
    },
}
SSE_EVENT = {  # each event's data: a JSON chunk, or [DONE] at the end
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}},
}
GENERATED = {  # a JSON completion, or with "stream": true its server-sent events
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}},
    **errors(404, 503, 504),
}


@site.get(
    "/health",
    responses={
        200: {"content": {"application/json": {"schema": HEALTH}}},
        503: {
            "description": "the model is loading or failed to load",
            "content": {"application/json": {"schema": HEALTH}},
        },
    },
)
async def health(request: Request) -> JSONResponse:
    scheduler: Scheduler = request.app.state.scheduler
    if scheduler.ready.is_set():
        return JSONResponse({"status": "ok", "model": request.app.state.settings.model_name})
    body = (
        {"status": "error", "error": scheduler.load_error}
        if scheduler.load_error
        else {"status": "loading"}
    )
    return JSONResponse(body, status_code=503)


@site.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@api.get("/v1/models")
async def models(request: Request) -> dict:
    count(request, 200)
    return {"object": "list", "data": [model_card(request.app.state.settings)]}


@api.get("/v1/models/{name:path}", responses=errors(404))
async def model(request: Request, name: str) -> dict:
    settings = request.app.state.settings
    check_model(name, settings.model_name)
    count(request, 200)
    return model_card(settings)


TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
TOKENIZED = {  # vLLM's TokenizeResponse
    "type": "object",
    "required": ["count", "max_model_len", "tokens", "token_strs"],
    "properties": {
        "count": {"type": "integer"},
        "max_model_len": {"type": "integer"},
        "tokens": TOKENS,
        "token_strs": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
    },
}
DETOKENIZED = {
    "type": "object",
    "required": ["prompt"],
    "properties": {"prompt": {"type": "string"}},
}
TOKENIZER_INFO = {
    "type": "object",
    "required": ["tokenizer_class", "eos_token", "model_max_length", "chat_template"],
    "properties": {
        "tokenizer_class": {"type": "string"},
        "eos_token": {"type": "string"},
        "model_max_length": {"type": "integer"},
        "chat_template": {"type": "string"},
    },
}


def answer(schema: dict, *statuses: int) -> dict:
    return {200: {"content": {"application/json": {"schema": schema}}}, **errors(*statuses)}


@api.post(
    "/tokenize", responses=answer(TOKENIZED, 404, 503), openapi_extra=json_body(TokenizeRequest)
)
async def tokenize(request: Request) -> dict:
    """vLLM's /tokenize: a prompt's ids (special-token names become their ids, as a Hugging
    Face tokenizer has it), or a conversation's as the chat template renders it."""
    settings: Settings = request.app.state.settings
    tokenizer: Tokenizer = request.app.state.tokenizer
    req: TokenizeRequest = parse(
        TokenizeRequest, await read_json(request, settings.limits.max_body)
    )
    check_model(req.model, settings.model_name)
    block = ready_engine(request.app.state.scheduler).model.config.block_size
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "send either prompt or messages")
    if req.prompt is not None:
        prompt_ids([req.prompt], tokenizer, settings.limits, tokenizer.n_vocab)  # the caps
        ids = tokenizer.encode_with_special_tokens(req.prompt)
    else:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        check_messages(messages, settings.limits)
        try:
            if req.add_generation_prompt:
                ids = tokenizer.render_for_completion(messages)
            else:
                ids = tokenizer.render_conversation(messages, max_tokens=2**31).ids
        except ConversationError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
    strs = [token_name(tokenizer, t) for t in ids] if req.return_token_strs else None
    count(request, 200)
    return {"count": len(ids), "max_model_len": block, "tokens": ids, "token_strs": strs}


@api.post(
    "/detokenize", responses=answer(DETOKENIZED, 404), openapi_extra=json_body(DetokenizeRequest)
)
async def detokenize(request: Request) -> dict:
    settings: Settings = request.app.state.settings
    tokenizer: Tokenizer = request.app.state.tokenizer
    req = parse(DetokenizeRequest, await read_json(request, settings.limits.max_body))
    check_model(req.model, settings.model_name)
    if not all(t < tokenizer.n_vocab for t in req.tokens):
        raise APIError(400, f"tokens: ids must be in 0..{tokenizer.n_vocab - 1}", param="tokens")
    count(request, 200)
    return {"prompt": tokenizer.decode(req.tokens)}


@api.get("/tokenizer_info", responses=answer(TOKENIZER_INFO, 503))
async def tokenizer_configuration(request: Request) -> dict:
    """vLLM's /tokenizer_info: lm-eval reads `eos_token` (and `chat_template`) from it."""
    block = ready_engine(request.app.state.scheduler).model.config.block_size
    count(request, 200)
    return tokenizer_info(request.app.state.tokenizer, block)


@api.post("/v1/chat/completions", responses=GENERATED, openapi_extra=json_body(ChatRequest))
async def chat_completions(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    tokenizer: Tokenizer = request.app.state.tokenizer
    req: ChatRequest = parse(ChatRequest, await read_json(request, settings.limits.max_body))
    check_model(req.model, settings.model_name)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    check_messages(messages, settings.limits)
    try:
        prompt = tokenizer.render_for_completion(messages)
    except ConversationError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    return await generate(request, req, [prompt], chat_stop_ids(tokenizer), chat=True)


@api.post("/v1/completions", responses=GENERATED, openapi_extra=json_body(CompletionRequest))
async def completions(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    tokenizer: Tokenizer = request.app.state.tokenizer
    req: CompletionRequest = parse(
        CompletionRequest, await read_json(request, settings.limits.max_body)
    )
    check_model(req.model, settings.model_name)
    n_vocab = ready_engine(request.app.state.scheduler).n_vocab
    prompts = prompt_ids(req.prompts(), tokenizer, settings.limits, n_vocab)
    stops = frozenset({tokenizer.eot_id})
    return await generate(request, req, prompts, stops, chat=False, echo=req.echo)


async def generate(
    request: Request,
    req: GenerationParams,
    prompts: list[list[int]],
    stop_ids: frozenset[int],
    chat: bool,
    echo: bool = False,
) -> Response:
    """Queue the generation of every prompt; its streamed events, or once it has finished, its
    JSON. echo: each choice's text (and logprobs) start with its prompt's."""
    scheduler: Scheduler = request.app.state.scheduler
    block = ready_engine(scheduler).model.config.block_size
    max_tokens = [token_budget(prompt, req, block, chat) for prompt in prompts]
    if req.n > scheduler.max_batch:
        raise APIError(
            400, f"n: at most {scheduler.max_batch} (the server's --max-batch)", param="n"
        )
    sampling = Sampling(
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p if req.top_p < 1 else None,
    )
    tokenizer: Tokenizer = request.app.state.tokenizer
    streams = [TextStream(tokenizer, req.stop) for _ in range(len(prompts) * req.n)]
    loop = asyncio.get_running_loop()
    logprobs = req.logprob_count()
    scored_prompt = logprobs if echo else None
    job = Job(
        prompts, max_tokens, sampling, req.n, stop_ids, req.seed, loop, streams, logprobs,
        scored_prompt,
    )  # fmt: skip
    out = Output(
        job,
        req,
        chat=chat,
        echo=echo,
        scheduler=scheduler,
        model_name=request.app.state.settings.model_name,
        tokenizer=tokenizer,
    )
    try:
        scheduler.submit(job)
    except QueueFull:
        raise APIError(
            503,
            "the server is busy: too many requests are waiting; retry shortly",
            type="server_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    scheduler.metrics.prompt_tokens.inc(sum(map(len, prompts)))
    count(request, 200)
    if req.stream:
        return StreamingResponse(
            out.sse(request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        async for events in wait_events(job, request):
            out.apply(events)
            if out.done:
                break
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    finally:
        out.close()
    return JSONResponse(out.response())


async def wait_events(job: Job, request: Request):
    """The job's event batches as they come; ClientGone when the client disconnects, a 504
    once the request has run past the server's request_timeout."""
    limit = request.app.state.settings.request_timeout
    deadline = job.submitted + limit
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise APIError(
                504,
                f"the request ran past the server's --request-timeout of {limit:g} s",
                type="server_error",
                code="request_timeout",
            )
        try:
            item = await asyncio.wait_for(job.events.get(), timeout=min(0.25, left))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone from None
            continue
        if isinstance(item, EngineError):
            raise APIError(400, str(item))
        if isinstance(item, Exception):
            raise APIError(500, str(item), type="server_error")
        yield item


# ------------------------------------------------------------------------------------- output
class Output:
    """One request's choices (sample j of prompt p is choice p * n + j): their text so far (the
    scheduler's thread turns tokens into text), logprobs when asked for, finish reasons and
    token counts, rendered as OpenAI's JSON or server-sent events."""

    def __init__(
        self,
        job: Job,
        req: GenerationParams,
        *,
        chat: bool,
        echo: bool,
        scheduler: Scheduler,
        model_name: str,
        tokenizer: Tokenizer,
    ):
        self.job, self.req, self.chat, self.echo = job, req, chat, echo
        self.scheduler, self.model_name, self.tokenizer = scheduler, model_name, tokenizer
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        n = len(job.prompts) * req.n
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.tokens = [0] * n
        self.logprobs: list | None = None  # per choice: chat entries or LegacyLogprobs
        if job.logprobs is not None:
            self.logprobs = [[] if chat else LegacyLogprobs(tokenizer) for _ in range(n)]

    @property
    def done(self) -> bool:
        return all(self.finish)

    def apply(self, events: list[Event]) -> list[tuple[int, str, str | None, dict | None]]:
        """(choice, new text, finish reason if it just ended, new logprobs or None) for each
        event; a choice's first event with echo brings its prompt's text and logprobs."""
        updates = []
        for event in events:
            i = event.index
            start = len(self.logprobs[i]) if self.logprobs is not None else 0
            text = event.text
            if self.echo and self.tokens[i] == 0:
                text = self._echo(i, event.prompt_logprobs) + text
            self.tokens[i] += 1
            self.texts[i] += text
            self.finish[i] = event.finish_reason
            if self.logprobs is not None and event.token not in self.job.stop_ids:
                self._add_logprob(i, event)
            updates.append((i, text, event.finish_reason, self._logprobs_since(i, start)))
        return updates

    def _echo(self, i: int, scored: list | None) -> str:
        """The prompt of choice i, whose tokens (with their logprobs) open its logprobs."""
        prompt = self.job.prompts[i // self.req.n]
        if self.logprobs is not None and scored is not None:
            for token, entry in zip(prompt, scored, strict=True):
                self.logprobs[i].add(token, entry)
        return self.tokenizer.decode(prompt)

    def _add_logprob(self, i: int, event: Event) -> None:
        if self.chat:
            self.logprobs[i].append(chat_entry(self.tokenizer, event.logprob))
        else:
            self.logprobs[i].add(event.token, event.logprob)

    def _logprobs_since(self, i: int, start: int) -> dict | None:
        """Choice i's logprobs from entry `start` on, in the API's shape (None: not asked)."""
        if self.logprobs is None:
            return None
        if self.chat:
            return {"content": self.logprobs[i][start:]}
        return self.logprobs[i].since(start)

    def close(self) -> None:
        """Stop whatever is still generating (the client left, or an error)."""
        if not self.done:
            self.scheduler.cancel(self.job)
            self.scheduler.metrics.cancelled.inc()

    def usage(self) -> dict:
        prompt, completion = sum(map(len, self.job.prompts)), sum(self.tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def response(self) -> dict:
        choices = []
        for i, (text, reason) in enumerate(zip(self.texts, self.finish, strict=True)):
            logprobs = self._logprobs_since(i, 0)
            choice = {"index": i, "finish_reason": reason, "logprobs": logprobs}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
            "usage": self.usage(),
        }

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta(
        self,
        i: int,
        text: str | None,
        reason: str | None,
        logprobs: dict | None = None,
        role: bool = False,
    ) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
        return {"index": i, "text": text or "", "finish_reason": reason, "logprobs": logprobs}

    async def sse(self, request: Request) -> AsyncIterator[str]:
        try:
            if self.chat:
                for i in range(len(self.texts)):
                    yield self.chunk([self.delta(i, None, None, role=True)])
            async for events in wait_events(self.job, request):
                for i, text, reason, logprobs in self.apply(events):
                    new_logprobs = logprobs is not None and bool(
                        logprobs["content"] if self.chat else logprobs["tokens"]
                    )
                    if text or reason or new_logprobs:
                        yield self.chunk([self.delta(i, text, reason, logprobs)])
                if self.done:
                    break
            if self.req.stream_options and self.req.stream_options.include_usage:
                yield self.chunk([], usage=self.usage())
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            self.close()
