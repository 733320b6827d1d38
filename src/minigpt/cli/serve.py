"""`minigpt serve`: the OpenAI-compatible server and its chat page."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from minigpt.cli.common import add_model_arguments, add_prefix_cache_argument
from minigpt.errors import MinigptError


def add_serve_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with a web chat page",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health, "
        "/metrics and a chat page at /, batching concurrent requests continuously.",
    )
    add_model_arguments(parser, dtype="auto")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000)")
    parser.add_argument(
        "--max-batch", type=int, default=16, help="sequences decoded together at most (16)"
    )
    parser.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait for a row (64)"
    )
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=512,
        help="prompt tokens prefilled per step, together and between decode steps, so a long "
        "prompt does not stall the running streams (512)",
    )
    add_prefix_cache_argument(parser, default=512)
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (seen in the process list: prefer "
        "--api-key-file or MINIGPT_API_KEY, comma-separated keys)",
    )
    parser.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="require one of the keys in PATH (one a line; blank lines and # comments skipped)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser pages from ORIGIN to call the API (repeat for several)",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients use (default: --model's last path part)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="answer requests with this Host header (name or name:port; repeat for several); "
        "bound to loopback, only localhost, 127.0.0.1 and [::1] on --port are answered otherwise",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="cut a client whose request headers, or whose body, take longer (30)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="cancel a generation running longer, answering 504 (600)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="open connections at most; more requests get 503 (256)",
    )
    parser.add_argument("--max-messages", type=int, default=500, help="per request (500)")
    parser.add_argument(
        "--max-message-chars", type=int, default=8000, help="characters per message (8000)"
    )
    parser.add_argument(
        "--max-total-chars", type=int, default=32000, help="characters per request (32000)"
    )
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from minigpt.cli.common import (
        check_model_args,
        check_prefix_cache,
        load_inference_model,
        warn_if_base_model,
    )
    from minigpt.engine import Engine
    from minigpt.serve import Limits, create_app
    from minigpt.serve.guard import is_loopback, loopback_hosts, server_config

    for name in (
        "max_batch",
        "max_queue",
        "max_prefill_tokens",
        "max_messages",
        "max_message_chars",
        "max_total_chars",
        "max_connections",
    ):
        if getattr(args, name) < 1:
            raise MinigptError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("read_timeout", "request_timeout"):
        if not getattr(args, name) > 0:
            raise MinigptError(f"--{name.replace('_', '-')} must be > 0 seconds")
    if not 0 <= args.port < 65536:
        raise MinigptError(f"--port {args.port} is not a port number (0..65535)")
    check_prefix_cache(args)
    check_model_args(args)  # a bad --model or --device fails here, not after the server starts

    def load() -> Engine:
        model, n_vocab = load_inference_model(args)
        return Engine(model, n_vocab, prefix_cache_mb=args.kv_cache_mb)

    api_keys = read_api_keys(args)
    allowed_hosts = tuple(args.allowed_host) or None
    if is_loopback(args.host):  # DNS rebinding: a page elsewhere must not reach us by name
        allowed_hosts = loopback_hosts(args.port) + tuple(args.allowed_host)
    chat_model = warn_if_base_model("serve", args.model)
    app = create_app(
        load,
        args.served_model_name or Path(args.model).resolve().name,
        chat_model=chat_model,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens,
        api_keys=api_keys,
        cors_origins=tuple(args.cors_origin),
        limits=Limits(args.max_messages, args.max_message_chars, args.max_total_chars),
        allowed_hosts=allowed_hosts,
        body_timeout=args.read_timeout,
        request_timeout=args.request_timeout,
    )
    # Ctrl-C: streams still open after 5 s are cut (their generations stop), then the process ends
    config = server_config(
        app,
        args.host,
        args.port,
        read_timeout=args.read_timeout,
        max_connections=args.max_connections,
        log_level="info",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    scheduler = app.state.scheduler

    def stop(_message: str) -> None:
        server.should_exit = True

    scheduler.on_load_error = stop
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"minigpt serve: chat page at http://{host}:{args.port}/ (API at /v1); loading the model")
    server.run()
    if scheduler.load_error:
        raise MinigptError(scheduler.load_error)
    return 0


def read_api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """The keys from --api-key, --api-key-file (one a line) and MINIGPT_API_KEY (comma-separated)."""
    keys = [] if args.api_key is None else [args.api_key]  # "" too: refused, not read as no key
    keys += [k.strip() for k in os.environ.get("MINIGPT_API_KEY", "").split(",") if k.strip()]
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text("utf-8").splitlines()
        except OSError as e:
            raise MinigptError(f"--api-key-file: cannot read {args.api_key_file} ({e})") from None
        from_file = [
            line.strip() for line in lines if line.strip() and not line.strip().startswith("#")
        ]
        if not from_file:
            raise MinigptError(f"--api-key-file {args.api_key_file} holds no key")
        keys += from_file
    return tuple(dict.fromkeys(keys))
