"""What stands between the network and the routes: read timeouts, a connection limit, the
Host-header allow-list and the security headers.

A client that sends its headers or its body too slowly (slow loris) is cut off: the headers by
`TimedH11Protocol` (uvicorn itself only times out idle keep-alive connections), the body by
`Guard`, which answers 408. `server_config` builds the uvicorn config with both, so the CLI and
the tests run the same server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re

import uvicorn
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from minigpt.serve.protocol import APIError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def loopback_hosts(port: int) -> tuple[str, ...]:
    """The Host headers a browser sends to this server on loopback (any port when port is 0)."""
    return tuple(f"{name}:{port}" if port else name for name in LOOPBACK_NAMES)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived
    within `header_timeout` seconds of its opening or of its last response."""

    header_timeout = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        cycle = self.cycle  # a new request replaces it once its headers are in
        self.loop.call_later(self.header_timeout, self._headers_late, cycle)

    def _headers_late(self, cycle) -> None:
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


def server_config(
    app,
    host: str,
    port: int,
    *,
    read_timeout: float = 30.0,
    keep_alive: float = 5.0,
    max_connections: int = 256,
    **options,
) -> uvicorn.Config:
    """uvicorn on h11 with a header timeout, an idle keep-alive timeout and, beyond
    max_connections open connections or requests, 503s. (The body's timeout is `Guard`'s.)"""
    protocol = type("Protocol", (TimedH11Protocol,), {"header_timeout": read_timeout})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=keep_alive,
        limit_concurrency=max_connections,
        **options,
    )


def inline_hashes(page: str, tag: str) -> str:
    """CSP sources allowing exactly the page's own inline <tag> blocks."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
    digests = (base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() for b in blocks)
    return " ".join(f"'sha256-{d}'" for d in digests)


def page_policy(page: str) -> str:
    """The chat page's Content-Security-Policy: its own inline script and style, calls to this
    server only, and no framing (clickjacking)."""
    return (
        f"default-src 'none'; script-src {inline_hashes(page, 'script')}; "
        f"style-src {inline_hashes(page, 'style')}; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


class Guard:
    """ASGI middleware: rejects a Host outside `allowed_hosts` (400; DNS rebinding), bounds the
    time to read a request body (408), and adds
    `nosniff` to every response and `page_headers` to the chat page's."""

    def __init__(
        self,
        app,
        *,
        allowed_hosts: tuple[str, ...] | None,
        body_timeout: float,
        page_headers: dict[str, str],
    ) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.body_timeout = body_timeout
        self.page_headers = [(k.lower().encode(), v.encode()) for k, v in page_headers.items()]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = [(b"x-content-type-options", b"nosniff")]
        if scope["path"] == "/":
            extra += self.page_headers

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        error = self.refuse(scope, headers)
        if error is not None:
            response = JSONResponse(error.body(), status_code=error.status)
            return await response(scope, receive, send_with_headers)
        await self.app(scope, self.timed(receive), send_with_headers)

    def refuse(self, scope, headers: dict[str, str]) -> APIError | None:
        host = headers.get("host", "").lower()
        if self.allowed is not None and host not in self.allowed:
            if host.rpartition(":")[0] not in self.allowed:  # an entry without a port
                return APIError(
                    400,
                    f"Host {host!r} is not allowed; this server answers "
                    f"{', '.join(sorted(self.allowed))} (--allowed-host adds names)",
                    code="host_not_allowed",
                )
        return None

    def timed(self, receive):
        """`receive`, raising a 408 once the body has taken longer than body_timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        done = False

        async def receive_in_time():
            nonlocal done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise APIError(
                    408,
                    f"the request body did not arrive within {self.body_timeout:g} s",
                    code="request_timeout",
                    headers={"Connection": "close"},
                ) from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return receive_in_time
