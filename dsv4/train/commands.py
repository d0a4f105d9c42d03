"""``dsv4 corpus`` and ``dsv4 tokenizer``: write the synthetic agent corpus, and train the model's tokenizer on it.

The two steps are separate commands because each output is an artifact to pin: the tokenizer is trained once on
a training corpus; evaluation corpora are then written with ``--tokenizer`` so that their haystack lengths are
exact token counts of the model's own tokenizer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dsv4.chat.encoding import THINKING_MODES
from dsv4.chat.tokenizer import load_tokenizer
from dsv4.train.corpus import CorpusConfig, read_corpus, read_manifest, write_corpus
from dsv4.train.tasks import TASKS
from dsv4.train.tokenizer import VOCAB_SIZE, tokenizer_report, train_tokenizer
from dsv4.train.words import SPLITS


def _range(text: str) -> tuple[int, int]:
    """``N`` or ``LOW:HIGH``, positive integers."""
    try:
        low, _, high = text.partition(":")
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW:HIGH, got {text!r}") from None
    if not 0 < bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return bounds


def _depths(text: str) -> tuple[float, ...]:
    try:
        depths = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if any(not 0 <= depth <= 1 for depth in depths):
        raise argparse.ArgumentTypeError(f"depths are fractions of the haystack in [0, 1], got {text!r}")
    return depths


def _tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(part.strip() for part in text.split(","))
    if unknown := [task for task in tasks if task not in TASKS]:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(TASKS)}")
    return tasks


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def run_corpus(args: argparse.Namespace) -> int:
    config = CorpusConfig(
        seed=args.seed,
        split=args.split,
        tasks=args.tasks,
        haystack_tokens=args.haystack_tokens,
        needles=(len(args.depths),) * 2 if args.depths else args.needles,
        depths=args.depths,
        thinking_modes=THINKING_MODES if args.thinking_mode == "mixed" else (args.thinking_mode,),
    )
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    started = time.perf_counter()
    manifest = write_corpus(args.out, config, args.samples, tokenizer, progress=not args.quiet)
    tasks = ", ".join(f"{task} {count}" for task, count in manifest["first_tasks"].items())
    lengths = "exact (tokenizer)" if tokenizer else "estimated as pre-tokenised pieces (no --tokenizer)"
    print(
        f"wrote {manifest['samples']} {config.split} samples ({manifest['text_bytes'] / 1e6:.2f} MB of text, "
        f"{len(manifest['shards'])} shard(s)) to {args.out} in {time.perf_counter() - started:.1f} s"
    )
    print(f"  first tasks: {tasks}; haystack lengths {lengths}")
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.corpus)
    if manifest["config"]["split"] != "train":
        raise ValueError(f"{args.corpus} is a {manifest['config']['split']} corpus: train the tokenizer on train data")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory")
    started = time.perf_counter()
    texts = [sample.text for sample in read_corpus(args.corpus)]
    tokenizer = train_tokenizer(texts, args.vocab_size, progress=not args.quiet)
    trained = time.perf_counter() - started
    report = tokenizer_report(tokenizer, texts)
    if report["round_trip_failures"]:
        raise ValueError(f"{report['round_trip_failures']} corpus texts do not decode back to themselves")
    tokenizer.save(out)
    print(
        f"trained a {tokenizer.vocab_size}-id byte-level BPE ({len(tokenizer.special_token_ids)} V4 tokens) on "
        f"{report['texts']} texts ({report['bytes'] / 1e6:.2f} MB) in {trained:.1f} s; saved to {out}"
    )
    print(
        f"  {report['tokens_per_byte']:.3f} tokens per byte ({report['tokens']} tokens), DSML invokes "
        f"{report['invoke_tokens_per_byte']:.3f} tokens per byte, {report['tokens_per_invoke']:.1f} tokens each; "
        "every text round-trips byte-exactly"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    corpus = sub.add_parser(
        "corpus",
        help="write the synthetic agent corpus (JSONL shards + manifest)",
        description="Write samples 0..N-1 of the deterministic V4-format agent corpus to an empty directory.",
    )
    corpus.add_argument("--out", required=True, type=Path, help="a new or empty directory")
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--samples", type=_positive, default=1000)
    corpus.add_argument("--split", choices=SPLITS, default="train", help="heldout: disjoint seeds and identifiers")
    corpus.add_argument("--tasks", type=_tasks, default=TASKS, help=f"comma-separated subset of {','.join(TASKS)}")
    corpus.add_argument(
        "--haystack-tokens",
        type=_range,
        default=(1024, 2048),
        metavar="N|LOW:HIGH",
        help="length of haystack/recall conversations in tokens (drawn per sample in LOW:HIGH)",
    )
    corpus.add_argument("--needles", type=_range, default=(1, 3), metavar="N|LOW:HIGH", help="facts per haystack")
    corpus.add_argument(
        "--depths",
        type=_depths,
        default=None,
        help="place one needle at each of these haystack fractions, e.g. 0,0.5,1",
    )
    corpus.add_argument("--thinking-mode", choices=(*THINKING_MODES, "mixed"), default="mixed")
    corpus.add_argument("--tokenizer", type=Path, default=None, help="size haystacks in this tokenizer's tokens")
    corpus.add_argument("--quiet", action="store_true", help="no progress bar")
    corpus.set_defaults(func=run_corpus)

    tokenizer = sub.add_parser(
        "tokenizer",
        help="train the byte-level BPE with the V4 special tokens on a corpus",
        description="Train the model's tokenizer on a train-split corpus written by `dsv4 corpus` and save "
        "tokenizer.json + tokenizer_config.json.",
    )
    tokenizer.add_argument("--corpus", required=True, type=Path, help="a directory written by `dsv4 corpus`")
    tokenizer.add_argument("--out", required=True, type=Path, help="a new or empty directory")
    tokenizer.add_argument("--vocab-size", type=_positive, default=VOCAB_SIZE)
    tokenizer.add_argument("--quiet", action="store_true", help="no progress bar")
    tokenizer.set_defaults(func=run_tokenizer)
