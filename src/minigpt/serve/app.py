"""The HTTP API: OpenAI's chat and text completions (streamed or not), models, health, metrics
and the chat page, over one `Scheduler` that owns the model.

Every request is checked before it reaches the engine: malformed JSON, wrong fields, caps on
messages and characters, prompts that do not fit the context, a full queue, an unknown model or
a missing API key each get their status and OpenAI's error JSON. A client that goes away stops
its generation and frees its rows.
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

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from minigpt.engine import Engine, EngineError, Sampling
from minigpt.serve.metrics import Metrics
from minigpt.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    GenerationParams,
    parse,
)
from minigpt.serve.scheduler import Job, QueueFull, Scheduler
from minigpt.serve.text import TextStream
from minigpt.tokenizer import ConversationError, get_tokenizer

log = logging.getLogger("minigpt.serve")


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may send (nanochat's defaults)."""

    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000


class ClientGone(Exception):
    """The client disconnected while its request was generating."""


def create_app(
    load: Callable[[], Engine],
    model_name: str,
    *,
    max_batch: int = 16,
    max_queue: int = 64,
    api_key: str | None = None,
    cors_origins: tuple[str, ...] = (),
    limits: Limits = Limits(),
) -> FastAPI:
    """The server's ASGI app. `load` builds the engine on the scheduler's thread when the app
    starts; until it returns, /health and the API answer 503."""
    metrics = Metrics()
    scheduler = Scheduler(load, max_batch, max_queue, metrics)
    tokenizer = get_tokenizer()
    chat_stops = frozenset(
        {tokenizer.eot_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id}
    )
    page = (resources.files("minigpt.serve") / "static" / "index.html").read_text("utf-8")
    max_body = 8 * limits.max_total_chars + 65536  # JSON may escape a character as 6 bytes

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="minigpt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )

    def count(request: Request, status: int) -> None:
        metrics.requests.labels(request.url.path, str(status)).inc()

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        count(request, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        error = APIError(e.status_code, str(e.detail), code=str(e.status_code))
        return await api_error(request, error)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        error = APIError(500, "internal error; see the server log", type="server_error")
        return await api_error(request, error)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), api_key):
            raise APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    def engine() -> Engine:
        if scheduler.load_error:
            raise APIError(
                503, f"the model failed to load: {scheduler.load_error}", type="server_error"
            )
        if not scheduler.ready.is_set():
            raise APIError(
                503, "the model is still loading", type="server_error", headers={"Retry-After": "5"}
            )
        return scheduler.engine

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "minigpt"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        if scheduler.ready.is_set():
            return JSONResponse({"status": "ok", "model": model_name})
        body = (
            {"status": "error", "error": scheduler.load_error}
            if scheduler.load_error
            else {"status": "loading"}
        )
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models(request: Request) -> dict:
        count(request, 200)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model(request: Request, name: str) -> dict:
        check_model(name)
        count(request, 200)
        return model_card()

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def read_json(request: Request):
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

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        req: ChatRequest = parse(ChatRequest, await read_json(request))
        check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        check_sizes(messages)
        try:
            prompt = tokenizer.render_for_completion(messages)
        except ConversationError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        return await generate(request, req, prompt, chat_stops, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        check_model(req.model)
        if len(req.prompt) > limits.max_total_chars:
            raise APIError(
                400,
                f"prompt has {len(req.prompt)} characters; the limit is {limits.max_total_chars}",
                param="prompt",
            )
        # an empty prompt starts from <|endoftext|>, as GPT-2's unconditional samples do
        prompt = tokenizer.encode(req.prompt) or [tokenizer.eot_id]
        return await generate(request, req, prompt, frozenset({tokenizer.eot_id}), chat=False)

    def check_sizes(messages: list[dict[str, str]]) -> None:
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
                f"the messages have {total} characters; the limit is {limits.max_total_chars} "
                f"in all",
                param="messages",
            )

    async def generate(
        request: Request,
        req: GenerationParams,
        prompt: list[int],
        stop_ids: frozenset[int],
        chat: bool,
    ) -> Response:
        block = engine().model.config.block_size
        wanted = req.token_limit()
        if len(prompt) >= block:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens; this model's context is {block} tokens, "
                f"so it must be shorter",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = wanted or block - len(prompt)
        if len(prompt) + max_tokens > block:
            raise APIError(
                400,
                f"this model's context is {block} tokens; the prompt has {len(prompt)} tokens "
                f"and max_tokens asks for {max_tokens} more ({len(prompt) + max_tokens} in all). "
                f"Lower max_tokens or shorten the prompt.",
                param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
                code="context_length_exceeded",
            )
        if req.n > max_batch:
            raise APIError(400, f"n: at most {max_batch} (the server's --max-batch)", param="n")
        sampling = Sampling(
            temperature=req.temperature,
            top_k=req.top_k or None,
            top_p=req.top_p if req.top_p < 1 else None,
        )
        job = Job(
            prompt, max_tokens, sampling, req.n, stop_ids, req.seed, asyncio.get_running_loop()
        )
        out = Output(job, req, chat, stop_ids)
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
        metrics.prompt_tokens.inc(len(prompt))
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

    class Output:
        """One request's choices: their text so far, finish reasons and token counts."""

        def __init__(self, job: Job, req: GenerationParams, chat: bool, stop_ids: frozenset[int]):
            self.job, self.req, self.chat, self.stop_ids = job, req, chat, stop_ids
            self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            self.created = int(time.time())
            self.streams = [TextStream(tokenizer, req.stop) for _ in range(req.n)]
            self.texts = [""] * req.n
            self.finish: list[str | None] = [None] * req.n
            self.tokens = [0] * req.n

        @property
        def done(self) -> bool:
            return all(self.finish)

        def apply(self, events) -> list[tuple[int, str, str | None]]:
            """(choice, new text, finish reason if it just ended) for each event."""
            updates = []
            for event in events:
                i = event.index
                if self.finish[i]:  # ended by a stop string; the engine had a token in flight
                    continue
                self.tokens[i] += 1
                text = "" if event.token in self.stop_ids else self.streams[i].push(event.token)
                if self.streams[i].stopped:
                    self.finish[i] = "stop"
                    scheduler.cancel(self.job, i)
                elif event.finish_reason:
                    text += self.streams[i].finish()
                    self.finish[i] = event.finish_reason
                self.texts[i] += text
                updates.append((i, text, self.finish[i]))
            return updates

        def close(self) -> None:
            """Stop whatever is still generating (the client left, or an error)."""
            if not self.done:
                scheduler.cancel(self.job)
                metrics.cancelled.inc()

        def usage(self) -> dict:
            prompt, completion = len(self.job.prompt), sum(self.tokens)
            return {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }

        def response(self) -> dict:
            choices = []
            for i, (text, reason) in enumerate(zip(self.texts, self.finish, strict=True)):
                choice = {"index": i, "finish_reason": reason, "logprobs": None}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                choices.append(choice)
            return {
                "id": self.id,
                "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created,
                "model": model_name,
                "choices": choices,
                "usage": self.usage(),
            }

        def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
            body = {
                "id": self.id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created,
                "model": model_name,
                "choices": choices,
            }
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def delta(self, i: int, text: str | None, reason: str | None, role: bool = False) -> dict:
            if self.chat:
                delta = {"role": "assistant", "content": ""} if role else {}
                if text:
                    delta["content"] = text
                return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}

        async def sse(self, request: Request) -> AsyncIterator[str]:
            try:
                if self.chat:
                    for i in range(self.req.n):
                        yield self.chunk([self.delta(i, None, None, role=True)])
                async for events in wait_events(self.job, request):
                    for i, text, reason in self.apply(events):
                        if text or reason:
                            yield self.chunk([self.delta(i, text, reason)])
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

    async def wait_events(job: Job, request: Request):
        """The job's event batches as they come; ClientGone when the client disconnects."""
        while True:
            try:
                item = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone from None
                continue
            if isinstance(item, EngineError):
                raise APIError(400, str(item))
            if isinstance(item, Exception):
                raise APIError(500, str(item), type="server_error")
            yield item

    return app
