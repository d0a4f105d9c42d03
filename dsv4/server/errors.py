"""API errors and their two wire shapes.

Agent clients show the server's error message to the user or the model, and retry on some statuses, so
every failure - malformed JSON, a wrong type, an unknown model, a full queue - is raised as one
:class:`APIError` and rendered in the shape the caller's SDK parses: OpenAI's
``{"error": {"message", "type", "param", "code"}}`` or Anthropic's ``{"type": "error", "error": {"type",
"message"}}``.
"""

from __future__ import annotations

from typing import Any

# OpenAI reports every client error as invalid_request_error; the status tells them apart.
_OPENAI_TYPES = {429: "rate_limit_error", 503: "service_unavailable"}
_ANTHROPIC_TYPES = {404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
# Messages quote what the client sent; a quoted 10 MB string would make a 10 MB error body.
MAX_MESSAGE_CHARS = 2000


def printable(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` safe to put in a response: lone surrogates escaped (they cannot be encoded as UTF-8), and cut
    to ``limit`` characters."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """A request the server answers with ``status`` and an error body instead of a completion."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message, param = printable(message), None if param is None else printable(param, 200)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        kind = _OPENAI_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
