"""The tasks of the synthetic corpus: tools, conversations, identifiers and haystacks.

A task writes a conversation through :class:`Dialog`, which keeps the messages in the official encoder's input
form and, for every assistant turn, its target: the exact tool calls, or the strings the answer must contain.
Every random choice comes from the sample's :class:`~dsv4.train.rng.Rng`; a haystack's filler lines come from a
forked stream, so the conversation around a haystack is the same whatever length it is filled to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from dsv4.chat.encoding import encode_messages, to_json
from dsv4.train import words
from dsv4.train.rng import Rng

if TYPE_CHECKING:
    from dsv4.train.corpus import CorpusConfig

SHORT_TASKS = ("lookup", "file", "arithmetic", "chain")
LONG_TASKS = ("haystack", "recall")
TASKS = SHORT_TASKS + LONG_TASKS
# Relative frequency of each task in a mixed corpus: the long-context tasks are the point of the model.
TASK_WEIGHTS = {"lookup": 2, "file": 1, "arithmetic": 2, "chain": 2, "haystack": 4, "recall": 2}

TokenCounter = Callable[[str], int]


def _tool(name: str, description: str, parameters: dict[str, tuple[str, str]], **extra: Any) -> dict[str, Any]:
    properties = {key: {"type": kind, "description": text} for key, (kind, text) in parameters.items()}
    for key, schema in extra.items():
        properties[key].update(schema)
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(parameters)},
        },
    }


TOOLS: dict[str, dict[str, Any]] = {
    tool["function"]["name"]: tool
    for tool in (
        _tool("kv_get", "Read the value stored under a key in the key-value store.", {"key": ("string", "The key.")}),
        _tool("read_file", "Read a text file.", {"path": ("string", "Absolute path of the file.")}),
        _tool(
            "calculator",
            "Apply an arithmetic operation to two integers.",
            {
                "operation": ("string", "The operation."),
                "a": ("integer", "The first operand."),
                "b": ("integer", "The second operand."),
            },
            operation={"enum": ["add", "subtract", "multiply"]},
        ),
        _tool(
            "get_employee",
            "Fetch an employee's record by id.",
            {"employee_id": ("string", "The id, such as E-12345.")},
        ),
        _tool(
            "send_email",
            "Send an email.",
            {"to": ("string", "The recipient's address."), "subject": ("string", "The subject line.")},
        ),
        _tool(
            "open_vault",
            "Open a vault with its access code.",
            {"vault": ("string", "The vault's name."), "code": ("integer", "The access code.")},
        ),
        _tool(
            "issue_pass",
            "Issue a visitor pass for an employee's badge.",
            {"name": ("string", "The employee's full name."), "badge": ("integer", "The badge number.")},
        ),
        _tool("get_weather", "Get the current weather in a city.", {"city": ("string", "The city.")}),
        _tool("search_web", "Search the web.", {"query": ("string", "The search query.")}),
    )
}
_TASK_TOOLS = {
    "lookup": ("kv_get",),
    "file": ("read_file",),
    "arithmetic": ("calculator",),
    "chain": ("get_employee", "send_email"),
}
_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are an operations agent. Use the tools to look things up; never guess a value.",
    "You are a careful assistant with access to the company's systems.",
)


class Dialog:
    """Builds the message list of one conversation and the target of each assistant turn."""

    def __init__(self, thinking_mode: str, tasks: list[str]) -> None:
        self.thinking_mode = thinking_mode
        self.tasks = tasks
        self.messages: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self._calls = 0

    def system(self, text: str, tools: Sequence[str]) -> None:
        message: dict[str, Any] = {"role": "system", "content": text}
        if tools:
            message["tools"] = [TOOLS[name] for name in tools]
        self.messages.append(message)

    def user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def _assistant(self, reasoning: str, content: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.thinking_mode == "thinking":
            message["reasoning_content"] = reasoning
        self.messages.append(message)
        return message

    def call(self, task: str, reasoning: str, calls: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """An assistant turn made of tool calls (run in parallel); returns their ids for the results."""
        ids = [f"call_{self._calls + position}" for position in range(len(calls))]
        self._calls += len(calls)
        self._assistant(reasoning, "")["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": to_json(arguments)}}
            for call_id, (name, arguments) in zip(ids, calls, strict=True)
        ]
        self.targets.append(
            {"task": task, "tool_calls": [{"name": name, "arguments": arguments} for name, arguments in calls]}
        )
        return ids

    def result(self, call_id: str, content: str | dict[str, Any]) -> None:
        text = content if isinstance(content, str) else to_json(content)
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": text})

    def answer(self, task: str, reasoning: str, content: str, expected: Sequence[str]) -> None:
        self._assistant(reasoning, content)
        self.targets.append({"task": task, "answer": list(expected)})

    def render(self) -> str:
        return encode_messages(self.messages, self.thinking_mode)


# ---- identifiers and values


class _Names:
    """Identifiers of one sample, all from its split's word pairs, never the same twice."""

    def __init__(self, rng: Rng, split: str) -> None:
        self.rng = rng
        self.split = split
        self.used: set[str] = set()

    def _pair(self, first: Sequence[str], second: Sequence[str]) -> tuple[str, str]:
        while True:
            pair = (self.rng.choice(first), self.rng.choice(second))
            if words.split_of(pair) == self.split:
                return pair

    def _fresh(self, make: Callable[[], str]) -> str:
        while (name := make()) in self.used:
            pass
        self.used.add(name)
        return name

    def thing(self) -> str:
        """A vault, service or similar: ``amber-falcon``; may repeat (filler)."""
        return "-".join(self._pair(words.ADJECTIVES, words.NOUNS))

    def person(self) -> str:
        """``First Last``; may repeat (filler)."""
        return " ".join(self._pair(words.FIRST_NAMES, words.LAST_NAMES))

    def unique_thing(self) -> str:
        return self._fresh(self.thing)

    def unique_key(self) -> str:
        return self._fresh(lambda: f"{self.thing()}-{self.rng.randint(1, 99)}")

    def unique_person(self) -> str:
        return self._fresh(self.person)

    def employee_id(self) -> str:
        return self._fresh(lambda: f"E-{self.rng.randint(10000, 99999)}")


def _email(person: str) -> str:
    return person.lower().replace(" ", ".") + "@example.com"


# ---- short tasks


def _lookup(dialog: Dialog, rng: Rng, names: _Names) -> None:
    task = "lookup"
    kind = rng.weighted(("one", "two", "missing", "moved"), (5, 2, 1, 2))
    if kind == "two":
        first, second = names.unique_key(), names.unique_key()
        dialog.keys += [first, second]
        values = [str(rng.randint(10, 99999)) for _ in range(2)]
        dialog.user(
            rng.choice(("What are the values of {} and {}?", "Get me {} and {} from the store.")).format(first, second)
        )
        ids = dialog.call(
            task,
            f"I need two keys, {first} and {second}; I can read both at once.",
            [("kv_get", {"key": first}), ("kv_get", {"key": second})],
        )
        for call_id, key, value in zip(ids, (first, second), values, strict=True):
            dialog.result(call_id, {"key": key, "value": int(value)})
        dialog.answer(
            task,
            f"kv_get returned {values[0]} for {first} and {values[1]} for {second}.",
            f"{first} is {values[0]} and {second} is {values[1]}.",
            values,
        )
        return
    key = names.unique_key()
    dialog.keys.append(key)
    dialog.user(
        rng.choice(
            ("What is the value of {}?", "Look up {} in the key-value store.", "I need the value under {}.")
        ).format(key)
    )
    (call_id,) = dialog.call(
        task, f"The user wants the value of {key}. I will read it with kv_get.", [("kv_get", {"key": key})]
    )
    if kind == "missing":
        dialog.result(call_id, {"key": key, "error": "not found"})
        dialog.answer(
            task, f"kv_get found nothing under {key}.", f"There is no value stored under {key}.", ["no value"]
        )
        return
    read = key
    if kind == "moved":
        read = names.unique_key()
        dialog.keys.append(read)
        dialog.result(call_id, {"key": key, "moved_to": read})
        (call_id,) = dialog.call(task, f"{key} moved to {read}. I will read {read}.", [("kv_get", {"key": read})])
    value = str(rng.randint(10, 99999))
    dialog.result(call_id, {"key": read, "value": int(value)})
    dialog.answer(task, f"kv_get returned {value} for {read}.", f"The value of {key} is {value}.", [value])


def _config_file(rng: Rng, service: str) -> tuple[str, dict[str, str]]:
    values = {
        "port": str(rng.randint(1024, 65000)),
        "workers": str(rng.randint(1, 64)),
        "timeout": str(rng.randint(5, 600)),
        "replicas": str(rng.randint(1, 12)),
        "max_connections": str(rng.randint(10, 5000)),
    }
    host = ".".join(str(rng.randint(1, 254)) for _ in range(4))
    text = (
        f"# settings of {service}\n[server]\nhost = {host}\nport = {values['port']}\nworkers = {values['workers']}\n"
        f"timeout = {values['timeout']}\n[cluster]\nreplicas = {values['replicas']}\n"
        f"max_connections = {values['max_connections']}\n"
    )
    return text, values


def _file(dialog: Dialog, rng: Rng, names: _Names) -> None:
    task = "file"
    service = names.unique_thing()
    dialog.keys.append(service)
    path = f"/srv/{service}/config.ini"
    setting = rng.choice(words.CONFIG_FIELDS)
    text, values = _config_file(rng, service)
    dialog.user(
        rng.choice(("What is the {} of {}? Its config is {}.", "Check {2}: what {0} does {1} use?")).format(
            setting, service, path
        )
    )
    (call_id,) = dialog.call(task, f"The answer is in {path}. I will read it.", [("read_file", {"path": path})])
    dialog.result(call_id, text)
    value = values[setting]
    dialog.answer(task, f"The file sets {setting} = {value}.", f"The {setting} of {service} is {value}.", [value])


_OPERATIONS = {"add": ("+", "plus"), "subtract": ("-", "minus"), "multiply": ("*", "times")}


def _compute(operation: str, a: int, b: int) -> int:
    return a + b if operation == "add" else a - b if operation == "subtract" else a * b


def _arithmetic(dialog: Dialog, rng: Rng, names: _Names) -> None:
    task = "arithmetic"
    first = rng.choice(tuple(_OPERATIONS))
    a, b = rng.randint(2, 9999), rng.randint(2, 999)
    symbol, word = _OPERATIONS[first]
    result = _compute(first, a, b)
    if rng.chance(0.5):
        dialog.user(rng.choice(("What is {} {} {}?", "Compute {} {} {}.")).format(a, rng.choice((symbol, word)), b))
        (call_id,) = dialog.call(
            task,
            f"I will compute {a} {symbol} {b} with the calculator.",
            [("calculator", {"operation": first, "a": a, "b": b})],
        )
        dialog.result(call_id, {"result": result})
        dialog.answer(task, f"{a} {symbol} {b} = {result}.", f"{a} {symbol} {b} = {result}.", [str(result)])
        return
    second = rng.choice(tuple(_OPERATIONS))
    c = rng.randint(2, 99)
    symbol2 = _OPERATIONS[second][0]
    final = _compute(second, result, c)
    dialog.user(rng.choice(("What is ({} {} {}) {} {}?", "Compute ({} {} {}) {} {}.")).format(a, symbol, b, symbol2, c))
    (call_id,) = dialog.call(
        task,
        f"First {a} {symbol} {b}, then {symbol2} {c}. I start with {a} {symbol} {b}.",
        [("calculator", {"operation": first, "a": a, "b": b})],
    )
    dialog.result(call_id, {"result": result})
    (call_id,) = dialog.call(
        task,
        f"{a} {symbol} {b} = {result}. Now {result} {symbol2} {c}.",
        [("calculator", {"operation": second, "a": result, "b": c})],
    )
    dialog.result(call_id, {"result": final})
    dialog.answer(
        task, f"{result} {symbol2} {c} = {final}.", f"({a} {symbol} {b}) {symbol2} {c} = {final}.", [str(final)]
    )


def _employee(rng: Rng, person: str, employee_id: str, manager_id: str) -> dict[str, str]:
    return {
        "employee_id": employee_id,
        "name": person,
        "department": rng.choice(words.DEPARTMENTS),
        "city": rng.choice(words.CITIES),
        "manager_id": manager_id,
        "email": _email(person),
    }


def _chain(dialog: Dialog, rng: Rng, names: _Names) -> None:
    task = "chain"
    person, manager = names.unique_person(), names.unique_person()
    dialog.keys += [person, manager]
    person_id, manager_id = names.employee_id(), names.employee_id()
    send = rng.chance(0.5)
    subject = rng.choice(("the weekly report", "the budget draft", "the incident summary", "the travel request"))
    if send:
        dialog.user(f"Send {subject} to the manager of employee {person_id}.")
    else:
        dialog.user(f"What is the email address of {person}'s manager? {person}'s employee id is {person_id}.")
    (call_id,) = dialog.call(
        task,
        f"I need the manager of {person_id}; their record names the manager.",
        [("get_employee", {"employee_id": person_id})],
    )
    dialog.result(call_id, _employee(rng, person, person_id, manager_id))
    (call_id,) = dialog.call(
        task,
        f"The manager of {person_id} is {manager_id}. I will fetch that record for the email.",
        [("get_employee", {"employee_id": manager_id})],
    )
    dialog.result(call_id, _employee(rng, manager, manager_id, names.employee_id()))
    email = _email(manager)
    if send:
        (call_id,) = dialog.call(
            task, f"{manager}'s email is {email}.", [("send_email", {"to": email, "subject": subject})]
        )
        dialog.result(call_id, {"status": "sent"})
        dialog.answer(task, "The email was sent.", f"I sent {subject} to {manager} ({email}).", [email])
    else:
        dialog.answer(task, f"{manager}'s email is {email}.", f"{person}'s manager is {manager}: {email}.", [email])


_SHORT = {"lookup": _lookup, "file": _file, "arithmetic": _arithmetic, "chain": _chain}


# ---- haystacks

_LOG_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
_LOG_STAMP = "%Y-%m-%d %H:%M:%S"


@dataclass(frozen=True)
class _Needle:
    """A fact hidden in a haystack, and the two ways a turn can ask for it: answer it, or act on it."""

    key: str
    value: str
    line: str
    question: str
    answer: str
    action_question: str
    action: tuple[str, dict[str, Any]]
    action_result: dict[str, Any]
    action_answer: str


class _Haystack:
    """One kind of long document (a service log, a staff list): look-alike filler lines and the needles.

    Filler lines name other vaults and people of the same split, so that a needle is found by its key, not
    by its shape; they never name a needle's key, so that every question has one answer.
    """

    def __init__(self, kind: str, rng: Rng, split: str) -> None:
        self.kind = kind
        self.rng = rng
        self.names = _Names(rng, split)
        self.start = rng.randint(0, 300 * 86400)

    @property
    def description(self) -> str:
        return "the service log" if self.kind == "log" else "the staff list"

    @property
    def action_tool(self) -> str:
        return "open_vault" if self.kind == "log" else "issue_pass"

    def path(self, owner: str) -> str:
        return f"/var/log/{owner}/events.log" if self.kind == "log" else f"/data/{owner}/staff.txt"

    def needle(self, key: str, value: str) -> _Needle:
        if self.kind == "log":
            return _Needle(
                key,
                value,
                f"INFO vault: access code for {key} is {value}",
                f"What is the access code for vault {key}?",
                f"The access code for {key} is {value}.",
                f"Open vault {key}.",
                ("open_vault", {"vault": key, "code": int(value)}),
                {"vault": key, "status": "open"},
                f"Vault {key} is open.",
            )
        return _Needle(
            key,
            value,
            self._record(key, value),
            f"What is the badge number of {key}?",
            f"{key}'s badge number is {value}.",
            f"Issue a visitor pass for {key}.",
            ("issue_pass", {"name": key, "badge": int(value)}),
            {"name": key, "status": "issued"},
            f"The pass for {key} is issued.",
        )

    def _record(self, person: str, badge: str) -> str:
        return (
            f"E-{self.rng.randint(10000, 99999)} | {person} | {self.rng.choice(words.DEPARTMENTS)} | "
            f"{self.rng.choice(words.CITIES)} | badge {badge}"
        )

    def filler(self, avoid: set[str]) -> tuple[int, str]:
        """The next filler line and the seconds since the previous one (log lines are stamped when the
        haystack is assembled, so that a needle slots in anywhere with its neighbour's time)."""
        rng = self.rng
        if self.kind == "records":
            return 0, self._record(self._other(self.names.person, avoid), str(rng.randint(10000, 99999)))
        gap = rng.randint(0, 9)
        if rng.chance(0.03):  # another vault's code: a needle must be told apart from these
            vault = self._other(self.names.thing, avoid)
            return gap, f"INFO vault: access code for {vault} is {rng.randint(10000, 99999)}"
        worker = f"{rng.choice(words.COMPONENTS)}-{rng.randint(1, 8)}"
        level = rng.weighted(("INFO", "DEBUG", "WARN", "ERROR"), (8, 2, 1, 1))
        body = rng.below(8)
        if body == 0:
            message = f"processed batch {rng.randint(100, 99999)} in {rng.randint(1, 900)} ms"
        elif body == 1:
            message = (
                f"{rng.choice(words.VERBS)} /{rng.choice(words.HTTP_PATHS)}/{rng.randint(1, 9999)} returned "
                f"{rng.choice((200, 201, 204, 400, 404, 500))} in {rng.randint(1, 900)} ms"
            )
        elif body == 2:
            message = f"cache hit ratio {rng.randint(0, 100)}%"
        elif body == 3:
            address = ".".join(str(rng.randint(1, 254)) for _ in range(3))
            message = f"connected to 10.{address}:{rng.randint(1024, 65000)}"
        elif body == 4:
            message = f"user {self._other(self.names.person, avoid)} signed in from {rng.choice(words.CITIES)}"
        elif body == 5:
            message = f"queue {rng.choice(words.NOUNS)} depth {rng.randint(0, 5000)}"
        elif body == 6:
            message = f"retrying job {rng.randint(1, 99999)} (attempt {rng.randint(2, 5)} of 5)"
        else:
            message = f"checkpoint {rng.randint(1, 9999)} written to /srv/{self._other(self.names.thing, avoid)}/data"
        return gap, f"{level} {worker}: {message}"

    @staticmethod
    def _other(make: Callable[[], str], avoid: set[str]) -> str:
        while (name := make()) in avoid:
            pass
        return name

    def line_text(self, seconds: int, line: str) -> str:
        if self.kind != "log":
            return line
        return f"{(_LOG_EPOCH + timedelta(seconds=self.start + seconds)).strftime(_LOG_STAMP)} {line}"

    def assemble(self, fillers: Sequence[tuple[int, str]], needles: Sequence[tuple[int, str]]) -> tuple[str, list[int]]:
        """The document: ``fillers`` with each needle line inserted before filler ``position``; returns the
        text and each needle line's offset in it (in the order of ``needles``)."""
        inserted: dict[int, list[int]] = {}
        for number, (position, _) in enumerate(needles):
            inserted.setdefault(position, []).append(number)
        lines: list[str] = []
        offsets = [0] * len(needles)
        length = 0
        seconds = 0

        def add(line: str) -> None:
            nonlocal length
            lines.append(line)
            length += len(line) + 1

        for position in range(len(fillers) + 1):
            for number in inserted.get(position, ()):
                offsets[number] = length
                add(self.line_text(seconds, needles[number][1]))
            if position < len(fillers):
                gap, line = fillers[position]
                seconds += gap
                add(self.line_text(seconds, line))
        return "\n".join(lines), offsets


@dataclass
class _Long:
    """A haystack or recall conversation, built around whatever haystack text it is given."""

    task: str
    thinking_mode: str
    system: str
    tools: list[str]
    path: str
    description: str
    needles: list[_Needle]
    asked: list[int]
    acted: list[bool]
    keys: list[str]

    def compose(self, haystack: str) -> Dialog:
        dialog = Dialog(self.thinking_mode, [self.task])
        dialog.keys = list(self.keys)
        dialog.system(self.system, self.tools)
        for turn, (number, act) in enumerate(zip(self.asked, self.acted, strict=True)):
            needle = self.needles[number]
            question = needle.action_question if act else needle.question
            if turn == 0 and self.task == "haystack":
                dialog.user(f"{self.path} has {self.description}. {question}")
                (call_id,) = dialog.call(
                    self.task, f"I need to read {self.path} first.", [("read_file", {"path": self.path})]
                )
                dialog.result(call_id, haystack)
            elif turn == 0:
                dialog.user(f"Here is {self.description}:\n\n{haystack}\n\n{question}")
            else:
                dialog.user(question)
            if act:
                name, arguments = needle.action
                (call_id,) = dialog.call(
                    self.task, f"The document says: {needle.line}. I will call {name}.", [(name, arguments)]
                )
                dialog.result(call_id, needle.action_result)
                dialog.answer(self.task, f"{name} succeeded.", needle.action_answer, [needle.key])
            else:
                dialog.answer(self.task, f"The document says: {needle.line}.", needle.answer, [needle.value])
        return dialog


def long_conversation(
    task: str, thinking_mode: str, rng: Rng, config: CorpusConfig, count: TokenCounter
) -> tuple[Dialog, str, list[dict[str, Any]]]:
    """A haystack/recall conversation whose rendered text is at most the drawn length in tokens, and as close
    to it as whole filler lines allow; returns it, the haystack text and the needle records."""
    names = _Names(rng, config.split)
    target = rng.randint(*config.haystack_tokens)
    haystack = _Haystack(rng.choice(("log", "records")), rng.fork(), config.split)
    if config.depths is not None:
        depths = list(config.depths)
    else:
        depths = [rng.fraction() for _ in range(rng.randint(*config.needles))]
    keys = [names.unique_thing() if haystack.kind == "log" else names.unique_person() for _ in depths]
    needles = [haystack.needle(key, str(rng.randint(10000, 99999))) for key in keys]
    asked = list(range(len(needles)))
    rng.shuffle(asked)
    owner = names.unique_thing()
    tools: list[str] = []
    if task == "haystack":
        tools = ["read_file", haystack.action_tool, *_distractors(rng, {"read_file", haystack.action_tool})]
        rng.shuffle(tools)
    plan = _Long(
        task=task,
        thinking_mode=thinking_mode,
        system=rng.choice(_SYSTEM_PROMPTS),
        tools=tools,
        path=haystack.path(owner),
        description=haystack.description,
        needles=needles,
        asked=asked,
        acted=[task == "haystack" and rng.chance(0.4) for _ in asked],
        keys=keys + ([owner] if task == "haystack" else []),
    )

    avoid = set(keys)
    fillers: list[tuple[int, str]] = []
    costs: list[int] = []

    def cost(position: int) -> int:
        while len(fillers) <= position:
            fillers.append(haystack.filler(avoid))
            costs.append(count(haystack.line_text(0, fillers[-1][1]) + "\n"))
        return costs[position]

    def build(lines: int) -> tuple[Dialog, str, list[int], list[int]]:
        positions = [math.floor(depth * lines + 0.5) for depth in depths]
        text, offsets = haystack.assemble(fillers[:lines], list(zip(positions, (n.line for n in needles), strict=True)))
        return plan.compose(text), text, offsets, positions

    overhead = count(build(0)[0].render())
    if overhead > config.haystack_tokens[1]:
        raise ValueError(
            f"a {task} sample needs {overhead} tokens without filler, more than haystack_tokens allows "
            f"({config.haystack_tokens[1]})"
        )
    # A conversation longer than the drawn length but within the range keeps its needles and gets no filler.
    target = max(target, overhead)
    lines, room = 0, target - overhead
    while cost(lines) <= room:
        room -= costs[lines]
        lines += 1
    came_down = False
    while True:
        dialog, text, offsets, positions = build(lines)
        total = count(dialog.render())
        if total > target:  # line counts are not exactly additive: drop lines until it fits
            excess = total - target
            while excess > 0 and lines > 0:
                lines -= 1
                excess -= costs[lines]
            came_down = True
            continue
        room = target - total
        if came_down or cost(lines) > room:
            break
        while cost(lines) <= room:
            room -= costs[lines]
            lines += 1
    # "line": the needle's line number in the haystack; "offset": where that line starts in it (the sample
    # shifts it to an offset in its text).
    records = [
        {"key": needle.key, "value": needle.value, "depth": depth, "line": position + number, "offset": offset}
        for number, (needle, depth, position, offset) in enumerate(
            sorted(zip(needles, depths, positions, offsets, strict=True), key=lambda record: record[3])
        )
    ]
    return dialog, text, records


def _distractors(rng: Rng, needed: set[str]) -> list[str]:
    """Zero to two tools the conversation does not need: the model must pick by name, not by presence."""
    others = [name for name in TOOLS if name not in needed]
    rng.shuffle(others)
    return others[: rng.randint(0, 2)]


def short_conversation(first: str, thinking_mode: str, rng: Rng, config: CorpusConfig) -> Dialog:
    """One to three short tasks in a row, each a new user request in the same conversation."""
    available = [task for task in config.tasks if task in SHORT_TASKS]
    tasks = [first] + [rng.choice(available) for _ in range(rng.weighted((0, 1, 2), (5, 3, 2)))]
    needed = {name for task in tasks for name in _TASK_TOOLS[task]}
    tools = sorted(needed) + _distractors(rng, needed)
    rng.shuffle(tools)
    dialog = Dialog(thinking_mode, tasks)
    dialog.system(rng.choice(_SYSTEM_PROMPTS), tools)
    names = _Names(rng, config.split)
    for task in tasks:
        _SHORT[task](dialog, rng, names)
    return dialog
