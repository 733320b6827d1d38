"""The OpenAI request shapes the server accepts, and its error type.

Requests are validated with pydantic; any problem becomes an `APIError` that the app renders as
OpenAI's error JSON, `{"error": {"message", "type", "param", "code"}}`, naming the field at fault.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

# OpenAI parameters this server does not implement: refused rather than silently ignored
UNSUPPORTED = ("logit_bias", "tools", "functions", "response_format")
UNSUPPORTED_SCHEMA = {
    name: {"enum": [None, False, []], "description": "not supported: leave it out"}
    for name in UNSUPPORTED
}
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # per stop string: what the stream may hold back waiting for one
_STOP = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
STOP_SCHEMA = {
    "anyOf": [_STOP, {"type": "array", "items": _STOP, "maxItems": MAX_STOPS}, {"type": "null"}]
}
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit, vLLM's default)
MAX_PROMPTS = 64  # prompts in one completions request
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT_SCHEMA = {  # text, texts, token ids, or lists of token ids
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_PROMPTS},
        _IDS,
        {"type": "array", "items": _IDS, "minItems": 1, "maxItems": MAX_PROMPTS},
    ]
}
Prompt = Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(PROMPT_SCHEMA)]


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type, headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)  # JSON's types as the OpenAPI document states them

    include_usage: bool = False


class GenerationParams(BaseModel):
    # strict: "5" is no integer and 1 no boolean, as the OpenAPI document says
    model_config = ConfigDict(
        extra="allow",
        strict=True,
        json_schema_extra=lambda schema: schema["properties"].update(UNSUPPORTED_SCHEMA),
    )

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 or null: no top-k cut")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Annotated[str | list[str] | None, WithJsonSchema(STOP_SCHEMA)] = Field(
        None, validate_default=True
    )  # a list once parsed
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(
                f"a stop string has {longest} characters; the limit is {MAX_STOP_CHARS}"
            )
        return stops

    def unsupported(self) -> str | None:
        extra = self.model_extra or {}
        unset = lambda v: v is None or v is False or v == []  # noqa: E731 (0 is not False)
        return next((k for k in UNSUPPORTED if not unset(extra.get(k))), None)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        """Alternatives to score per generated token; None: no logprobs."""
        return None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(GenerationParams):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationParams):
    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids (a list of them is several prompts)."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if len(prompt) > MAX_PROMPTS:
            raise APIError(
                400, f"{len(prompt)} prompts; the limit is {MAX_PROMPTS}", param="prompt"
            )
        return list(prompt)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a text prompt, or messages rendered with the chat template."""

    model_config = ConfigDict(strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # accepted as vLLM does; GPT-2 adds no special tokens
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def parse(model: type[BaseModel], data: Any) -> Any:
    """`data` as `model`, or a 400 APIError naming the first field at fault."""
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        loc = [str(p) for p in error["loc"] if not str(p).startswith("function-")]
        param = ".".join(loc) or None
        message = error["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}" if param else message, param=param) from None
    name = request.unsupported() if isinstance(request, GenerationParams) else None
    if name:
        raise APIError(400, f"{name} is not supported by this server", param=name)
    return request
