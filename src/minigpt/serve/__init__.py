"""`minigpt serve`: an OpenAI-compatible HTTP server with continuous batching and a chat page.

`app` holds the routes and OpenAI shapes, `guard` the timeouts, Host and Content-Type checks and
security headers in front of them, `scheduler` the thread that owns the engine, `text`
the streaming of token ids as text, `logprobs` their scores in OpenAI's shapes, `tokenize` vLLM's
tokenizer endpoints, `static/index.html` the offline chat page.
"""

from minigpt.serve.app import Limits, create_app

__all__ = ["Limits", "create_app"]
