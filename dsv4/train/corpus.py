"""A deterministic synthetic agent corpus in the exact V4 chat format, for training and evaluating a small V4.

Each sample is a conversation rendered by the project's own encoder (:func:`dsv4.chat.encoding.encode_messages`),
so the model learns the bytes the inference side will show it: the tools section, DSML tool calls, tool results
folded into user turns, ``<think>`` reasoning in thinking mode (dropped from earlier turns when the encoder drops
it). The tasks are what an agent does with a long context:

* ``lookup``: key-value reads, two keys in one parallel call, missing keys, keys that moved (a two-hop chain);
* ``file``: read a config file, answer one of its fields;
* ``arithmetic``: one or two calculator calls, the first result feeding the second;
* ``chain``: an employee record gives the manager's id, whose record gives the email (answered, or used in a
  ``send_email`` call);
* ``haystack``: ``read_file`` returns a long log or staff list; facts ("needles") sit at chosen depths among
  look-alike lines; the questions come in several turns and are answered, or acted on with a tool call whose
  arguments hold the fact;
* ``recall``: the same haystack pasted by the user in a conversation without tools.

Up to three of the short tasks follow each other in one conversation. Every sample records what an evaluator
needs: per assistant turn, the span of ``text`` the model writes (the loss mask) and its target (the exact tool
calls, or the strings the answer must contain); for haystacks, each needle's key, value, requested depth and
position.

Why on the fly, with shards only as a by-product: sample ``i`` of a (split, seed) is a pure function of those
three values (its own random stream, derived by hashing), so a training run draws samples by index, never
repeats one, and resumes from a step count without storing or shuffling data; :func:`write_corpus` writes JSONL
shards and a manifest with checksums for what must be pinned and inspected: the tokenizer's training text and
the evaluation sets. The random stream (:mod:`dsv4.train.rng`) is defined down to the bit, so the same seed
gives the same bytes on any machine and Python.

Held-out samples (split ``heldout``) come from a different seed space and use identifiers (store keys,
services, vaults, people) from word pairs that the training split never uses (:mod:`dsv4.train.words`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dsv4.chat.encoding import ASSISTANT, EOS, THINK_END, THINK_START, THINKING_MODES
from dsv4.chat.tokenizer import ChatTokenizer
from dsv4.train.rng import Rng
from dsv4.train.tasks import LONG_TASKS, TASK_WEIGHTS, TASKS, TokenCounter, long_conversation, short_conversation
from dsv4.train.tokenizer import count_pieces
from dsv4.train.words import SPLITS

FORMAT = "dsv4-corpus"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_SAMPLES = 1000


def sample_seed(split: str, seed: int, index: int) -> int:
    """Sample ``index``'s own stream: splits and seeds are separate seed spaces, samples independent."""
    digest = hashlib.blake2b(f"{FORMAT}\x1f{split}\x1f{seed}\x1f{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class CorpusConfig:
    """What a corpus is made of; together with a sample index it fixes every byte of that sample.

    ``haystack_tokens`` bounds the whole rendered conversation of a ``haystack``/``recall`` sample: each
    sample draws its length in the range (raised to what its conversation needs without filler, when that is
    more), and fills it to within a line; equal ends give exact lengths for an evaluation sweep.
    ``needles`` is the range of facts per haystack; ``depths``, when given, places exactly that many needles
    at those fractions of the haystack (0 is its first line, the farthest back).
    """

    seed: int = 0
    split: str = "train"
    tasks: tuple[str, ...] = TASKS
    haystack_tokens: tuple[int, int] = (1024, 2048)
    needles: tuple[int, int] = (1, 3)
    depths: tuple[float, ...] | None = None
    thinking_modes: tuple[str, ...] = THINKING_MODES

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not self.tasks or any(task not in TASKS for task in self.tasks):
            raise ValueError(f"tasks must be a non-empty selection of {TASKS}, got {self.tasks}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks are listed twice: {self.tasks}")
        low, high = self.haystack_tokens
        if not 0 < low <= high:
            raise ValueError(f"haystack_tokens must be a range 0 < low <= high, got {self.haystack_tokens}")
        if not 1 <= self.needles[0] <= self.needles[1]:
            raise ValueError(f"needles must be a range 1 <= low <= high, got {self.needles}")
        if self.depths is not None and (not self.depths or any(not 0 <= depth <= 1 for depth in self.depths)):
            raise ValueError(f"depths must be fractions in [0, 1], got {self.depths}")
        if not self.thinking_modes or any(mode not in THINKING_MODES for mode in self.thinking_modes):
            raise ValueError(f"thinking_modes must be a selection of {THINKING_MODES}, got {self.thinking_modes}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorpusConfig:
        depths = data.get("depths")
        return cls(
            seed=data["seed"],
            split=data["split"],
            tasks=tuple(data["tasks"]),
            haystack_tokens=tuple(data["haystack_tokens"]),
            needles=tuple(data["needles"]),
            depths=None if depths is None else tuple(depths),
            thinking_modes=tuple(data["thinking_modes"]),
        )


@dataclass
class Sample:
    """One rendered conversation and what the model is expected to write in it.

    ``spans[i]`` is the ``[start, end)`` range of ``text`` (Python string offsets) that assistant turn ``i``
    writes: after the ``<think>``/``</think>`` that ends the prompt, through its EOS. ``targets[i]`` says what
    that turn must do: ``{"task", "tool_calls": [{"name", "arguments"}]}`` (arguments as a JSON object) or
    ``{"task", "answer": [strings the content must contain]}``. ``keys`` are the identifiers the tasks are
    about. A haystack sample has ``haystack``, the range of ``text`` its document fills, and ``needles``, its
    facts in document order: ``key``, ``value``, the requested ``depth``, the ``line`` number in the document and
    the ``offset`` in ``text`` where that line starts.
    """

    id: str
    split: str
    seed: int
    index: int
    tasks: list[str]
    thinking_mode: str
    messages: list[dict[str, Any]]
    text: str
    spans: list[list[int]]
    targets: list[dict[str, Any]]
    keys: list[str]
    haystack: list[int] = field(default_factory=list)
    needles: list[dict[str, Any]] = field(default_factory=list)

    def prompt(self, turn: int) -> str:
        """What precedes assistant turn ``turn``: the evaluator's prompt for it."""
        return self.text[: self.spans[turn][0]]

    def completion(self, turn: int) -> str:
        start, end = self.spans[turn]
        return self.text[start:end]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Sample:
        return cls(**json.loads(line))


def assistant_spans(text: str) -> list[list[int]]:
    """The ranges a rendered conversation's assistant turns write: from after the mode token that follows
    ``<｜Assistant｜>`` through the turn's EOS (the generated text never contains these markers)."""
    spans = []
    position = 0
    while (start := text.find(ASSISTANT, position)) != -1:
        start += len(ASSISTANT)
        for mode_token in (THINK_START, THINK_END):
            if text.startswith(mode_token, start):
                start += len(mode_token)
                break
        else:
            raise ValueError(f"no <think> or </think> after the assistant marker at {start}")
        end = text.index(EOS, start) + len(EOS)
        spans.append([start, end])
        position = end
    return spans


def encode_sample(tokenizer: ChatTokenizer, sample: Sample) -> tuple[list[int], list[bool]]:
    """The token ids of ``sample.text`` and, per id, whether the model learns to predict it.

    Every span starts after a mode token and ends with EOS, which are single added tokens, so encoding the
    pieces apart gives exactly the ids of the whole text, and the mask falls on token boundaries.
    """
    ids: list[int] = []
    mask: list[bool] = []
    position = 0
    for start, end in sample.spans:
        for piece, learned in ((sample.text[position:start], False), (sample.text[start:end], True)):
            piece_ids = tokenizer.encode(piece)
            ids += piece_ids
            mask += [learned] * len(piece_ids)
        position = end
    tail = tokenizer.encode(sample.text[position:])
    return ids + tail, mask + [False] * len(tail)


class Corpus:
    """The samples of one configuration, by index: ``corpus[i]`` is computed on demand, always the same.

    With a ``tokenizer``, haystack lengths are exact token counts of that tokenizer; without one they are
    estimated as the number of pre-tokenised pieces (:func:`dsv4.train.tokenizer.count_pieces`).
    """

    def __init__(self, config: CorpusConfig, tokenizer: ChatTokenizer | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._count: TokenCounter = (lambda text: len(tokenizer.encode(text))) if tokenizer else count_pieces

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            raise IndexError(f"sample indices start at 0, got {index}")
        config = self.config
        rng = Rng(sample_seed(config.split, config.seed, index))
        thinking_mode = rng.choice(config.thinking_modes)
        first = rng.weighted(config.tasks, [TASK_WEIGHTS[task] for task in config.tasks])
        haystack, needles, span = "", [], []
        if first in LONG_TASKS:
            dialog, haystack, needles = long_conversation(first, thinking_mode, rng, config, self._count)
        else:
            dialog = short_conversation(first, thinking_mode, rng, config)
        text = dialog.render()
        spans = assistant_spans(text)
        if len(spans) != len(dialog.targets):
            raise AssertionError(f"sample {index}: {len(spans)} assistant spans for {len(dialog.targets)} turns")
        if haystack:
            start = text.index(haystack)
            span = [start, start + len(haystack)]
            for needle in needles:
                needle["offset"] += start
        return Sample(
            id=f"{config.split}-{config.seed}-{index}",
            split=config.split,
            seed=config.seed,
            index=index,
            tasks=dialog.tasks,
            thinking_mode=thinking_mode,
            messages=dialog.messages,
            text=text,
            spans=spans,
            targets=dialog.targets,
            keys=dialog.keys,
            haystack=span,
            needles=needles,
        )

    def samples(self, start: int, stop: int) -> Iterator[Sample]:
        return (self[index] for index in range(start, stop))


# ---- shards on disk


def _check_output_directory(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory")


def write_corpus(
    out: str | Path,
    config: CorpusConfig,
    samples: int,
    tokenizer: ChatTokenizer | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Write samples ``0 .. samples-1`` as JSONL shards of :data:`SHARD_SAMPLES` plus ``manifest.json``.

    The output is byte-identical for the same arguments on any machine: no times, paths or versions go in.
    The manifest holds the configuration (enough to regenerate every sample), the tokenizer that sized the
    haystacks (the SHA-256 of its JSON) and each shard's SHA-256. Returns the manifest. When a sample cannot
    be made (a haystack length too small for its conversation), the files written so far are removed again,
    so that no directory ever holds half a corpus.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    out = Path(out)
    _check_output_directory(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        manifest = _write_shards(out, Corpus(config, tokenizer), samples, written, progress)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            out.rmdir()
        raise
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return manifest


def _write_shards(out: Path, corpus: Corpus, samples: int, written: list[Path], progress: bool) -> dict[str, Any]:
    config, tokenizer = corpus.config, corpus.tokenizer
    shards: list[dict[str, Any]] = []
    tasks: dict[str, int] = dict.fromkeys(config.tasks, 0)
    text_bytes = 0
    with tqdm(total=samples, unit="sample", desc="corpus", disable=not progress) as bar:
        for first in range(0, samples, SHARD_SAMPLES):
            lines = []
            for sample in corpus.samples(first, min(first + SHARD_SAMPLES, samples)):
                lines.append(sample.to_json() + "\n")
                tasks[sample.tasks[0]] += 1
                text_bytes += len(sample.text.encode("utf-8"))
                bar.update()
            data = "".join(lines).encode("utf-8")
            path = out / f"{config.split}-{first // SHARD_SAMPLES:05d}.jsonl"
            written.append(path)
            path.write_bytes(data)
            shards.append(
                {
                    "file": path.name,
                    "samples": len(lines),
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": config.to_dict(),
        "samples": samples,
        "lengths": (
            {"tokenizer_sha256": tokenizer_digest(tokenizer)} if tokenizer else {"estimated": "pre-tokenised pieces"}
        ),
        "first_tasks": tasks,
        "text_bytes": text_bytes,
        "shards": shards,
    }


def tokenizer_digest(tokenizer: ChatTokenizer) -> str:
    """SHA-256 of the tokenizer's JSON: names the tokenizer a corpus was sized with."""
    return hashlib.sha256(tokenizer.tokenizer.to_str().encode("utf-8")).hexdigest()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: not a corpus written by `dsv4 corpus`")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has version {manifest.get('version')}, this dsv4 reads {FORMAT_VERSION}")
    return manifest


def read_corpus(directory: str | Path) -> Iterator[Sample]:
    """The samples of a written corpus in order, each shard checked against its manifest checksum."""
    directory = Path(directory)
    for shard in read_manifest(directory)["shards"]:
        data = (directory / shard["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise ValueError(f"{directory / shard['file']} does not match its checksum in {MANIFEST}")
        for line in data.decode("utf-8").splitlines():
            yield Sample.from_json(line)
