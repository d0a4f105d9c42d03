"""The ASGI application: routes, request ids, error bodies and the engine's lifetime.

The engine thread starts with the application and is stopped after uvicorn has drained the open
requests (graceful shutdown on SIGTERM), so no sequence is cut off while its client still listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsv4.server import anthropic_api, openai_api
from dsv4.server.engine_client import EngineClient
from dsv4.server.errors import APIError
from dsv4.server.metrics import ServerMetrics
from dsv4.server.serving import REQUEST_ID, Backend, ServerConfig, internal_error

log = logging.getLogger("dsv4.server")

# Routes whose requests are counted by path in the metrics; anything else is counted as "other".
ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/models",
        "/health",
        "/metrics",
    }
)
# Polled endpoints: their access lines would drown the others at INFO.
_QUIET = frozenset({"/health", "/metrics"})


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every log record, so that one request's lines can be grepped together."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# The status a response is counted and logged under when the client went away before its end (nginx's
# "client closed request"): a stream the client aborted after its 200 went out, or a request whose client
# hung up while it waited.
CLIENT_CLOSED = 499


class RequestContext:
    """Gives each HTTP request an id (log lines, ``x-request-id`` header, API object ids), logs one access
    line when the response is complete - after the last streamed byte - and counts it by route and status.

    It is also the last line of defence: an exception no handler turned into an API error is a bug, logged
    once here under the request's id and answered with a well-formed 500 in the route's error shape (with
    the ``x-request-id`` header), so that the connection stays usable for the client's next request. A
    response that started but never completed counts as 499: the client aborted it.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:24]
        token = REQUEST_ID.set(request_id)
        status: int | None = None
        complete = False
        start = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        path = scope["path"]
        note = ""
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            if status is None:
                log.exception("unhandled error")
                await _error_response(path, internal_error(error))(scope, receive, send_with_id)
            else:  # too late for a status: end the body so that the connection can serve the next request
                log.exception("unhandled error after the response started")
                note = " (cut short by an error)"
                with contextlib.suppress(Exception):
                    await send_with_id({"type": "http.response.body", "body": b"", "more_body": False})
                status = 500
        finally:
            if status is not None and not complete:
                note = f" (client closed the connection after {status} was sent)"
                status = CLIENT_CLOSED
            status = 500 if status is None else status
            self.metrics.http_requests.labels(path if path in ROUTES else "other", str(status)).inc()
            level = logging.DEBUG if path in _QUIET and status < 400 else logging.INFO
            elapsed = 1000 * (time.monotonic() - start)
            log.log(level, "%s %s %d %.0f ms%s", scope["method"], path, status, elapsed, note)
            REQUEST_ID.reset(token)


def _error_response(path: str, error: APIError) -> JSONResponse:
    body = error.anthropic_body() if path.startswith("/v1/messages") else error.openai_body()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def create_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    backend = Backend(engine, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        log.info("serving %s (context %d tokens)", ", ".join(config.model_names), engine.max_model_len)
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)
            log.info("engine stopped")

    app = FastAPI(title="dsv4", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestContext, metrics=backend.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> Response:
        if error.status >= 500:
            log.error("%s", error.message)
        return _error_response(request.url.path, error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        return _error_response(request.url.path, APIError(error.status_code, str(error.detail), headers=error.headers))

    # anything else is a bug: RequestContext logs it and answers 500 (an Exception handler here would be
    # Starlette's outermost middleware, which answers without the request id and re-raises to the server)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await openai_api.chat_completions(request, backend)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await openai_api.completions(request, backend)

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await anthropic_api.messages(request, backend)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        return await anthropic_api.count_tokens(request, backend)

    def model_card(name: str) -> dict[str, object]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "dsv4", "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card(name) for name in config.model_names]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        backend.check_model(name)
        return JSONResponse(model_card(name))

    @app.get("/health")
    async def health() -> Response:
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = backend.metrics.exposition()
        return Response(body, media_type=content_type)

    return app


@contextmanager
def serve_in_thread(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 30.0
) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread, for embedding and tests; yields the base URL (port 0
    picks a free port) and shuts the server down - lifespan included - on exit, waiting at most
    ``shutdown_timeout`` seconds for open responses."""
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=shutdown_timeout
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dsv4-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join()
