"""`minigpt serve`: the OpenAI-compatible server and its chat page."""

from __future__ import annotations

import argparse

from minigpt.cli.common import add_model_arguments
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
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser pages from ORIGIN to call the API (repeat for several)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="the model id clients use (default: --model)"
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

    from minigpt.cli.common import check_model_args, load_inference_model, warn_if_base_model
    from minigpt.engine import Engine
    from minigpt.serve import Limits, create_app

    for name in ("max_batch", "max_queue", "max_messages", "max_message_chars", "max_total_chars"):
        if getattr(args, name) < 1:
            raise MinigptError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.port < 65536:
        raise MinigptError(f"--port {args.port} is not a port number (0..65535)")
    check_model_args(args)  # a bad --model or --device fails here, not after the server starts

    def load() -> Engine:
        model, n_vocab = load_inference_model(args)
        return Engine(model, n_vocab)

    chat_model = warn_if_base_model("serve", args.model)
    app = create_app(
        load,
        args.served_model_name or args.model,
        chat_model=chat_model,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=args.api_key,
        cors_origins=tuple(args.cors_origin),
        limits=Limits(args.max_messages, args.max_message_chars, args.max_total_chars),
    )
    # Ctrl-C: streams still open after 5 s are cut (their generations stop), then the process ends
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5
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
