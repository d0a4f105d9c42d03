"""Request bodies before they cost anything: a byte limit, then JSON with a nesting limit and only strings
that can be encoded.

The byte limit is checked against ``Content-Length`` before a byte is read, then against the bytes as they
arrive (chunked uploads), so an oversized body is refused without being buffered. A parsed body is then
walked once, without recursion: every container deeper than the nesting limit, and every string or key
holding a lone UTF-16 surrogate (``"\\ud800"`` in the JSON: valid JSON, but not text - the tokenizer and
the UTF-8 encoder refuse it) is a 400 naming its JSON path. ``NaN`` and ``Infinity``, which Python's
parser accepts but JSON does not have, are refused as invalid JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import ClientDisconnect, Request

from dsv4.server.errors import APIError, bad_request

_SURROGATE = re.compile("[\ud800-\udfff]")


def too_large(size: int, limit: int, *, declared: bool) -> APIError:
    what = f"a Content-Length of {size} bytes" if declared else f"more than {limit} bytes"
    return APIError(
        413,
        f"the request body has {what}; this server accepts at most {limit} (dsv4 serve --max-body-bytes)",
        code="request_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large(int(length), limit, declared=True)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(size, limit, declared=False)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(499, "the client closed the connection while sending its request") from None
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_json(raw: bytes, max_depth: int) -> dict[str, Any]:
    """``raw`` as a JSON object, checked by :func:`check_json`. CPU-bound: large bodies go to a thread."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise bad_request(f"the request body nests deeper than {max_depth} levels", code="json_too_deep") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits, NaN
        raise bad_request(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    check_json(body, max_depth)
    return body


def json_path(path: tuple[str | int, ...]) -> str:
    """``("messages", 0, "content")`` -> ``messages[0].content``."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out or "the request body"


def check_json(body: dict[str, Any] | list[Any], max_depth: int) -> None:
    """Raise a 400 naming the first container nested deeper than ``max_depth`` (the body is level 1) or
    the first string or key that holds a lone surrogate."""
    stack: list[tuple[dict[str, Any] | list[Any], int, tuple[str | int, ...]]] = [(body, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if depth > max_depth:
            raise bad_request(
                f"{json_path(path)}: the request body nests deeper than {max_depth} levels",
                json_path(path),
                code="json_too_deep",
            )
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                where = json_path(path)
                raise bad_request(f"{where}: the key {key!r} holds a lone UTF-16 surrogate, which is not text", where)
            if isinstance(item, str):
                if not item.isascii() and _SURROGATE.search(item):
                    where = json_path((*path, key))
                    raise bad_request(
                        f"{where}: the string holds a lone UTF-16 surrogate (such as \\ud800), which is not text",
                        where,
                        code="invalid_unicode",
                    )
            elif isinstance(item, dict | list):
                stack.append((item, depth + 1, (*path, key)))
