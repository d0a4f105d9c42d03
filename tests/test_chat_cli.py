"""``dsv4 render`` and ``dsv4 parse``: exact bytes out, exit status 2 with a message on bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4.chat.encoding import EOS
from dsv4.cli import main

VECTORS = sorted((Path(__file__).parent / "data" / "encoding").glob("*.json"))


@pytest.mark.parametrize("case", VECTORS, ids=[path.stem for path in VECTORS])
def test_render_prints_the_prompt_bytes_and_nothing_else(
    case: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["render", str(case)]) == 0
    assert capsysbinary.readouterr().out == case.with_suffix(".txt").read_bytes()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{", "not a readable JSON case file"),
        ('["a list"]', '"messages" list'),
        ('{"messages": [{"role": "robot"}]}', "unknown role"),
        ('{"messages": [], "thinking_mode": "fast"}', "thinking_mode"),
    ],
)
def test_render_rejects_bad_case_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "case.json"
    if content is not None:
        path.write_text(content, "utf-8")
    assert main(["render", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("dsv4: error: ") and message in captured.err


def run_parse(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: bytes, mode: str) -> dict:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text), encoding="utf-8"))
    assert main(["parse", "--thinking-mode", mode]) == 0
    return json.loads(capsys.readouterr().out)


def test_parse_prints_an_openai_message_with_recoveries(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    completion = (
        'Need data.\n\n<|DSML|invoke name="get">\n<|DSML|parameter name="k" string="false">[1, 2]'
        "</|DSML|parameter>\n</|DSML|invoke>" + EOS
    )
    message = run_parse(monkeypatch, capsys, completion.encode("utf-8"), "thinking")
    assert set(message) == {"role", "content", "reasoning_content", "tool_calls", "recoveries"}
    assert (message["reasoning_content"], message["content"]) == ("Need data.", "")
    assert message["tool_calls"][0]["function"] == {"name": "get", "arguments": '{"k": [1, 2]}'}
    assert message["tool_calls"][0]["id"].startswith("call_")
    assert [r["kind"] for r in message["recoveries"]] == [
        "ascii_pipe",
        "missing_think_end",
        "missing_tool_calls_wrapper",
    ]
    assert all(r["detail"] for r in message["recoveries"])


def test_parse_of_a_clean_chat_completion(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    message = run_parse(monkeypatch, capsys, ("Grüße" + EOS).encode("utf-8"), "chat")
    assert message == {
        "role": "assistant",
        "content": "Grüße",
        "reasoning_content": "",
        "tool_calls": [],
        "recoveries": [],
    }


def test_parse_rejects_input_that_is_not_utf8(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe"), encoding="utf-8"))
    assert main(["parse"]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_the_installed_command_exits_non_zero_on_a_missing_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dsv4.cli", "render", str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == "" and "dsv4: error:" in result.stderr and "missing.json" in result.stderr
