"""The grammar a request's completion must match: V4's DSML tool calls, JSON contents, free reasoning.

A request's ``tool_choice``, strict tool schemas and ``response_format`` are promises about the reply that
a prompt instruction alone cannot keep. :func:`completion_grammar` turns them into an llguidance Lark
grammar over the *completion* - the text sampled after the prompt - which the engine enforces token by
token (``dsv4.engine.constraint``). The grammar is written so that every string it accepts parses with
:mod:`dsv4.chat.parser` without a single :class:`~dsv4.chat.parser.Recovery`:

* reasoning (thinking mode: the prompt ends with ``<think>``) is free text up to ``</think>``;
* ``auto``: free content, or content followed by one well-formed tool-call block; ``required``: a block
  (content and a block together are allowed only in ``auto``, so a forced call cannot be starved by
  endless prose); a named function: a block holding one invoke of it; ``none`` with tools: content only;
* the block is written canonically - ``\\n\\n<｜DSML｜tool_calls>\\n``, one invoke per line, one parameter
  per line - and EOS follows it at once;
* free text never holds what the parser would read as markup: ``<think>``, ``</think>``, any DSML tag, a
  control token (also with ASCII ``|``, which the parser folds into ``｜``), and text that ends the reply
  must not end in the start of a marker, which the parser would hold back and drop;
* parameters follow the V4 convention: ``string="true"`` with the raw text, else ``string="false"`` with
  JSON. Names come from the tool's ``properties`` (in their order, each at most once, ``required`` ones
  always); a tool with ``strict: true`` (or every tool, with ``strict_tools``) also gets values that
  validate against each property's schema. A tool that declares no properties takes any names.
* ``response_format`` ``json_object`` / ``json_schema``: the content is one JSON value of the schema.

JSON is written with the separators the V4 encoder uses (``", "`` and ``": "``) and no other whitespace,
so that a constrained reply looks like the tool calls the model was trained on. Special tokens that the
tokenizer has (``</think>`` and ``｜DSML｜`` in V4) are matched as those tokens, not as their text, so a
JSON string can never swallow one.

Every schema is checked with llguidance before anything is queued; a schema it cannot compile (or, for
strict ones, a keyword it does not enforce) raises :class:`GrammarError` naming the request field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance

from dsv4.chat.encoding import (
    DSML,
    EOS,
    INVOKE_CLOSE,
    PARAMETER_CLOSE,
    THINK_END,
    THINK_START,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
    TOOL_CALLS_SEPARATOR,
)
from dsv4.chat.tokenizer import CONTROL_TOKENS, MARKUP_TOKENS

_INVOKE_HEAD = f"<{DSML}invoke"
# The block's first line, with the separator the encoder puts between content and calls.
_BLOCK_OPEN = f"{TOOL_CALLS_SEPARATOR}{TOOL_CALLS_OPEN}\n"
# JSON exactly as dsv4.chat.encoding.to_json writes it.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Schema keywords that only annotate a string (no constraint on its text) or that the raw form enforces.
_RAW_STRING_KEYWORDS = frozenset({"type", "description", "title", "examples", "default", "minLength", "maxLength"})
# Top-level keywords of a tool's parameters that DSML parameters can honour; strict tools with others get a 400.
_PARAMETERS_KEYWORDS = frozenset(
    {"type", "properties", "required", "additionalProperties", "description", "title", "$defs", "definitions"}
)
# What a DSML name may not hold: the parser reads a name up to the first '"' or '>'.
_BAD_NAME = re.compile(r'["<>\n]')
# A parameter name of a tool that declares none: what the parser accepts, kept to one line.
_FREE_NAME = r'/[^"<>\n]{1,64}/'


class GrammarError(ValueError):
    """A request whose constraint cannot be built; ``field`` is the JSON path at fault (for the 400)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def _pipes(text: str) -> str:
    """A regex for ``text`` that also matches ASCII ``|`` wherever it has ``｜`` (the parser folds them)."""
    return "".join("[|｜]" if c == "｜" else re.escape(c) for c in text)


def _nested_prefixes(marker: str) -> str:
    """A regex matching the proper, non-empty prefixes of ``marker`` (``a(b(c)?)?`` for ``abcd``)."""
    parts = [_pipes(c) for c in marker[:-1]]
    regex = ""
    for part in reversed(parts[1:]):
        regex = f"(?:{part}{regex})?"
    return parts[0] + regex


def _forbidden() -> str:
    """Text the parser would read as markup anywhere in reasoning or content."""
    markers = [f"</?{_pipes(DSML)}", "</?think>", *(_pipes(token) for token in CONTROL_TOKENS)]
    return "|".join(markers)


def _held_at_end() -> str:
    """Endings the parser holds back as a possible marker start, and drops when EOS follows."""
    markers = [EOS, THINK_END, THINK_START, TOOL_CALLS_OPEN, _INVOKE_HEAD, f"</{DSML}"]
    return "|".join(_nested_prefixes(marker) for marker in markers)


def _regex(body: str) -> str:
    """A Lark regex literal (``/`` must be escaped inside one)."""
    return "/" + body.replace("/", "\\/") + "/"


_ANY = "(?s:.*)"
# Reasoning or content: any text without markup. Terminals (upper case) so that each is one lexeme.
_TERMINALS = f"""
TEXT: {_regex(_ANY)} & ~{_regex(f"{_ANY}({_forbidden()}){_ANY}")}
FINAL_TEXT: TEXT & ~{_regex(f"{_ANY}({_held_at_end()})")}
VALUE_TEXT: {_regex(_ANY)} & ~{_regex(f"{_ANY}(</{_pipes(DSML)}parameter>|{_pipes(EOS)}){_ANY}")}
"""


class _Markup:
    """Lark for fixed markup, with the tokenizer's single-token markers (``</think>``, ``｜DSML｜``)
    written as those tokens (``<[id]>``) and the rest as text."""

    def __init__(self, special_token_ids: Mapping[str, int]) -> None:
        self._ids = {token: special_token_ids[token] for token in MARKUP_TOKENS if token in special_token_ids}
        pattern = "|".join(re.escape(token) for token in sorted(self._ids, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None

    def pieces(self, text: str) -> list[tuple[str, bool]]:
        """``text`` as (piece, is_token) pairs, in order, without empty pieces."""
        if self._split is None:
            return [(text, False)]
        return [(p, p in self._ids) for p in self._split.split(text) if p]

    def lark(self, text: str) -> str:
        return " ".join(self._piece(p, token) for p, token in self.pieces(text))

    def _piece(self, piece: str, token: bool) -> str:
        """One piece as Lark; leading newlines are a literal of their own. The lexer is greedy and never
        gives back what it matched: after an invoke, ``"\\n"`` must end where both the next invoke
        (``"<"``) and the block's end (``"</"``) begin, not inside a literal ``"\\n</"``."""
        if token:
            return f"<[{self._ids[piece]}]>"
        body = piece.lstrip("\n")
        newlines = piece[: len(piece) - len(body)]
        return " ".join(_literal(part) for part in (newlines, body) if part)

    def after_text(self, terminal: str, text: str) -> tuple[str, str]:
        """(a terminal for ``terminal`` followed by the text that starts ``text``, lark for the rest).

        A free-text lexeme followed by a literal would need the lexer to give back what it already
        matched ("\\n\\n<" is valid text too); fusing that literal into the text terminal makes one regular
        language that ends exactly where the markup does."""
        pieces = self.pieces(text)
        head = ""
        if pieces and not pieces[0][1]:
            head = pieces.pop(0)[0]
        fused = f"{terminal} {_literal(head)}" if head else terminal
        return fused, " ".join(self._piece(p, token) for p, token in pieces)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _check_name(name: str, field: str) -> None:
    if not name or _BAD_NAME.search(name) or DSML in name or "|DSML|" in name:
        raise GrammarError(field, f"{name!r} cannot be written in a DSML tag (no quotes, '<', '>' or newlines)")


def _json_grammar(schema: Any, field: str, *, strict: bool) -> str:
    """``schema`` as an inline ``%json`` of the grammar, checked by llguidance first (lenient unless strict:
    keywords it cannot enforce are then ignored rather than refused)."""
    if not isinstance(schema, Mapping):
        raise GrammarError(field, f"must be a JSON schema object, got {type(schema).__name__}")
    guided = {**schema, "x-guidance": {**_JSON_OPTIONS, "lenient": not strict}}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(guided))
    except ValueError as error:
        raise GrammarError(field, f"not a usable JSON schema: {error}") from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise GrammarError(field, f"unsupported JSON schema: {messages[0]}")
    return "%json " + json.dumps(guided, ensure_ascii=False)


class _Builder:
    def __init__(self, special_token_ids: Mapping[str, int], strict_tools: bool) -> None:
        self.markup = _Markup(special_token_ids)
        self.strict_tools = strict_tools
        self.rules: list[str] = []
        self._count = 0

    def rule(self, body: str, name: str = "r") -> str:
        self._count += 1
        rule = f"{name}_{self._count}"
        self.rules.append(f"{rule}: {body}")
        return rule

    # ---------------------------------------------------------------- tool calls
    def block(self, tools: Sequence[Mapping[str, Any]], only: str | None, parallel: bool) -> str:
        """The tool-call block after its opening line (``_BLOCK_OPEN``, which callers may fuse into the
        text before it): the invokes, one per line, and the closing tag."""
        invokes = []
        for position, tool in enumerate(tools):
            function = tool["function"]
            if only is None or function["name"] == only:
                invokes.append(self.invoke(function, f"tools[{position}].function"))
        invoke = self.rule(" | ".join(invokes), "invoke")
        more = f' ("\\n" {invoke})*' if parallel and only is None else ""
        return f"{invoke}{more} {self.markup.lark(chr(10) + TOOL_CALLS_CLOSE)}"

    def invoke(self, function: Mapping[str, Any], field: str) -> str:
        name = function["name"]
        _check_name(name, f"{field}.name")
        strict = bool(function.get("strict")) or self.strict_tools
        parameters = function.get("parameters") or {}
        head = self.markup.lark(f'{_INVOKE_HEAD} name="{name}">\n')
        body = self.parameters(parameters, f"{field}.parameters", strict, explicit=bool(function.get("strict")))
        return self.rule(f"{head} {body} {self.markup.lark(INVOKE_CLOSE)}", "invoke")

    def parameters(self, schema: Mapping[str, Any], field: str, strict: bool, explicit: bool) -> str:
        """One line per parameter. Declared names in order, each once; ``required`` ones always."""
        if not isinstance(schema, Mapping):
            raise GrammarError(field, "must be a JSON schema object")
        if explicit:
            unsupported = sorted(set(schema) - _PARAMETERS_KEYWORDS)
            if unsupported:
                raise GrammarError(f"{field}.{unsupported[0]}", "not supported for a strict tool's parameters")
        properties = schema.get("properties")
        if properties is None:
            if schema.get("additionalProperties") is False:
                return '""'
            value = self.any_value()
            return f'({self.markup.lark(f"<{DSML}parameter name=")} "\\"" {_FREE_NAME} "\\"" {value})*'
        if not isinstance(properties, Mapping):
            raise GrammarError(f"{field}.properties", "must be an object")
        required = schema.get("required") or []
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise GrammarError(f"{field}.required", "must be an array of property names")
        for missing in sorted(set(required) - set(properties)):
            raise GrammarError(f"{field}.required", f"names {missing!r}, which is not in properties")
        definitions = {key: schema[key] for key in ("$defs", "definitions") if key in schema}
        lines = []
        for name, property_schema in properties.items():
            where = f"{field}.properties.{name}"
            _check_name(name, where)
            if strict:
                value = self.schema_value(property_schema, definitions, where, explicit)
            else:
                value = self.any_value()
            tag = self.markup.lark(f'<{DSML}parameter name="{name}"')
            line = self.rule(f"{tag} {value}")
            lines.append(line if name in required else f"{line}?")
        return " ".join(lines) if lines else '""'

    def value_close(self, string: bool) -> tuple[str, str]:
        """(what opens the value, what closes it) for a ``string="true"``/``"false"`` value."""
        opening = f' string="{"true" if string else "false"}">'
        return _literal(opening), self.markup.lark(PARAMETER_CLOSE + "\n")

    def raw_value(self, text_terminal: str) -> str:
        """A ``string="true"`` value: raw text matching ``text_terminal`` up to the closing tag."""
        opening, _ = self.value_close(True)
        fused, rest = self.markup.after_text(text_terminal, PARAMETER_CLOSE + "\n")
        terminal = f"RAW_{self._count + 1}"
        self.rules.append(f"{terminal}: {fused}")
        return self.rule(f"{opening} {terminal} {rest}", "raw")

    def json_value(self, json_grammar: str) -> str:
        opening, closing = self.value_close(False)
        return self.rule(f"{opening} {json_grammar} {closing}", "json")

    def any_value(self) -> str:
        return self.rule(f"{self.raw_value('VALUE_TEXT')} | {self.json_value(_json_grammar({}, '', strict=False))}")

    def schema_value(self, schema: Any, definitions: Mapping[str, Any], field: str, explicit: bool) -> str:
        """A value that validates against ``schema``: raw text for a plain string schema (V4's convention),
        JSON otherwise (a string schema with a pattern or format is written as a JSON string)."""
        if not isinstance(schema, Mapping):
            raise GrammarError(field, "must be a JSON schema object")
        if schema.get("type") == "string" and set(schema) <= _RAW_STRING_KEYWORDS:
            low, high = schema.get("minLength", 0), schema.get("maxLength")
            for key, bound in (("minLength", low), ("maxLength", high)):
                if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool) or bound < 0):
                    raise GrammarError(f"{field}.{key}", "must be a non-negative integer")
            if low == 0 and high is None:
                return self.raw_value("VALUE_TEXT")
            terminal = f"LENGTH_{self._count + 1}"
            upper = "" if high is None else str(high)
            self.rules.append(f"{terminal}: VALUE_TEXT & {_regex('(?s:.){' + f'{low},{upper}' + '}')}")
            return self.raw_value(terminal)
        enum = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum) and "type" not in schema:
            literals = " | ".join(_literal(v) for v in enum if re.search(_forbidden(), v) is None)
            if literals:
                opening, closing = self.value_close(True)
                return self.rule(f"{opening} ({literals}) {closing}", "enum")
        return self.json_value(_json_grammar({**schema, **definitions}, field, strict=explicit))


def completion_grammar(
    *,
    thinking: bool,
    tools: Sequence[Mapping[str, Any]],
    tool_choice: str,
    forced_tool: str | None,
    response_format: Mapping[str, Any] | None,
    special_token_ids: Mapping[str, int],
    parallel_tool_calls: bool = True,
    strict_tools: bool = False,
) -> str | None:
    """The Lark grammar of the completion, or None when the request promises nothing about it.

    ``thinking`` says the completion opens inside the reasoning (the prompt ends with ``<think>``).
    ``tools`` are OpenAI tool objects as :mod:`dsv4.chat.openai` validated them; ``tool_choice`` is
    ``auto``, ``none``, ``required`` or ``function`` (``forced_tool`` names it). ``special_token_ids``
    (text -> id) tells which markers are single tokens. Raises :class:`GrammarError`.
    """
    with_tools = bool(tools) and tool_choice != "none"
    if not with_tools and response_format is None and not (tools and tool_choice == "none"):
        return None
    b = _Builder(special_token_ids, strict_tools)
    content = None
    if response_format is not None:
        content = _response_format_grammar(response_format)

    if not with_tools:
        answer = content or "FINAL_TEXT"
    else:
        only = forced_tool if tool_choice == "function" else None
        block = b.block(tools, only, parallel_tool_calls)
        if tool_choice == "auto" and content is None:
            # prose, then maybe a block: the prose and the block's first characters are one lexeme
            fused, rest = b.markup.after_text("TEXT", _BLOCK_OPEN)
            b.rules.append(f"TEXT_THEN_BLOCK: {fused}")
            answer = f"FINAL_TEXT | TEXT_THEN_BLOCK {rest} {block}"
        else:
            answer = f"{b.markup.lark(_BLOCK_OPEN)} {block}"
            if tool_choice == "auto":  # a JSON content, or a block
                answer = f"{content} | {answer}"

    if thinking:
        fused, rest = b.markup.after_text("TEXT", THINK_END)
        b.rules.append(f"REASONING: {fused}")
        start = f"start: REASONING {rest} answer"
    else:
        start = "start: answer"
    return "\n".join(["%llguidance {}", start, f"answer: {answer}", *b.rules, _TERMINALS])


def _response_format_grammar(response_format: Mapping[str, Any]) -> str:
    kind = response_format.get("type")
    if kind == "json_object":
        return _json_grammar({"type": "object"}, "response_format", strict=False)
    spec = response_format.get("json_schema") or {}
    strict = spec.get("strict") is True
    return _json_grammar(spec.get("schema", {}), "response_format.json_schema.schema", strict=strict)
