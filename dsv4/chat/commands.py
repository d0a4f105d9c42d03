"""``dsv4 render`` and ``dsv4 parse``: the chat layer from the shell, for checking prompts and completions
against other implementations byte for byte."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dsv4.chat.encoding import THINKING_MODES, encode_messages
from dsv4.chat.parser import parse_completion


def register(sub: argparse._SubParsersAction) -> None:
    render = sub.add_parser(
        "render",
        help="print the prompt for a chat-encoding case file",
        description="Print the V4 prompt for CASE.json (the tests/data/encoding format) exactly, "
        "with no trailing newline.",
    )
    render.add_argument("case", type=Path, metavar="CASE.json")
    render.set_defaults(func=run_render)

    parse = sub.add_parser(
        "parse",
        help="parse a completion read from stdin",
        description="Parse one assistant completion from stdin and print it as an OpenAI-style message "
        "with the list of recoveries from model slips.",
    )
    parse.add_argument("--thinking-mode", choices=THINKING_MODES, default="chat")
    parse.set_defaults(func=run_parse)


def _load_case(path: Path) -> dict[str, Any]:
    try:
        case = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON case file ({error})") from error
    if not isinstance(case, dict) or not isinstance(case.get("messages"), list):
        raise ValueError(f'{path}: a case must be a JSON object with a "messages" list')
    return case


def run_render(args: argparse.Namespace) -> int:
    case = _load_case(args.case)
    prompt = encode_messages(
        case["messages"],
        case.get("thinking_mode", "chat"),
        context=case.get("context"),
        drop_thinking=case.get("drop_thinking", True),
        reasoning_effort=case.get("reasoning_effort"),
    )
    sys.stdout.buffer.write(prompt.encode("utf-8"))
    sys.stdout.buffer.flush()
    return 0


def run_parse(args: argparse.Namespace) -> int:
    try:
        completion = sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"stdin is not UTF-8 text ({error})") from error
    parsed = parse_completion(completion, args.thinking_mode)
    message = parsed.to_openai() | {"recoveries": [recovery.to_dict() for recovery in parsed.recoveries]}
    sys.stdout.write(json.dumps(message, ensure_ascii=False, indent=2) + "\n")
    return 0
