"""The small model's own byte-level BPE, trained on the synthetic corpus, holding every V4 special token.

Layout (the real V4 tokenizer's order where it has one): the V4 tokens first (BOS 0, EOS 1, then the other
control tokens and the ``<think>``/``</think>``/``｜DSML｜`` markup, :data:`dsv4.chat.tokenizer.V4_TOKENS`), then the
256 byte symbols in byte order, then the learned merges in the order they were learned. Control tokens are
special added tokens, markup tokens plain added tokens, exactly as :func:`dsv4.chat.tokenizer.build_test_tokenizer`
marks them, so each is one id wherever it appears and the BPE never learns pieces of them.

Pre-tokenisation: every digit is its own piece, then GPT-2's byte-level split (letters, punctuation runs and
whitespace apart, a word keeps its leading space). Single digits cost more tokens than DeepSeek's groups of
three, but a number then always tokenises the same way, digit by digit, wherever it stands: a small model copies
access codes and badge numbers digit by digit and computes sums with carries, instead of learning 1,000 opaque
three-digit tokens.

Training is deterministic: the BPE trainer counts words and breaks count ties by the pair itself, independent of
thread count and hash seeds; the special tokens are cut out of the text before counting (the trainer would
otherwise learn merges inside them), and the vocabulary is then assembled by hand in the fixed order above.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4.chat.encoding import DSML

# The byte alphabet is the one ChatTokenizer reads token bytes with: one definition for writer and reader.
from dsv4.chat.tokenizer import BYTE_SYMBOLS, CONTROL_TOKENS, MARKUP_TOKENS, V4_TOKENS, ChatTokenizer

# At most 2,048 ids. The corpus has a closed vocabulary: trained on it, the BPE runs out of pairs seen twice at
# about 1,990 ids (every word, template and identifier part is then one token), so a larger cap learns nothing
# and a smaller one splits the corpus's own words (1,024 ids: 10% more tokens per byte). The embedding and the
# output head of a dim-256 model then cost 2 x 2,048 x 256 x 2 bytes = 2 MiB in bf16, a twentieth of the 40 MB
# the whole model may take, and the head's matmul stays small next to the layers on a CPU.
VOCAB_SIZE = 2048
MIN_VOCAB_SIZE = len(V4_TOKENS) + 256
# A pair must occur this often to become a merge: one-off strings add nothing a small model could learn.
MIN_FREQUENCY = 2

_SPECIAL = re.compile("|".join(re.escape(token) for token in sorted(V4_TOKENS, key=len, reverse=True)))


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


_PRE_TOKENIZER = pre_tokenizer()


def count_pieces(text: str) -> int:
    """Pre-tokenised pieces of ``text`` (a V4 token is one): its token count under a BPE whose vocabulary holds
    every piece whole, which the corpus tokenizer nearly does; the estimate when no tokenizer is at hand."""
    specials = len(_SPECIAL.findall(text))
    return specials + sum(len(_PRE_TOKENIZER.pre_tokenize_str(piece)) for piece in _SPECIAL.split(text) if piece)


def _plain_pieces(texts: Iterable[str]) -> Iterator[str]:
    """The texts with the V4 tokens cut out: what the BPE sees between them at encoding time too."""
    for text in texts:
        yield from (piece for piece in _SPECIAL.split(text) if piece)


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE, *, progress: bool = False) -> ChatTokenizer:
    """A byte-level BPE of at most ``vocab_size`` ids learned from ``texts`` (fewer when the texts run out of
    pairs seen :data:`MIN_FREQUENCY` times)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (the V4 tokens and 256 bytes), got {vocab_size}"
        )
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(V4_TOKENS),
        min_frequency=MIN_FREQUENCY,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    learner.train_from_iterator(_plain_pieces(texts), trainer)
    merges = [(first, second) for first, second in json.loads(learner.to_str())["model"]["merges"]]

    vocab = {token: token_id for token_id, token in enumerate(V4_TOKENS)}
    for byte in range(256):
        vocab[BYTE_SYMBOLS[byte]] = len(vocab)
    for first, second in merges:
        vocab[first + second] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in CONTROL_TOKENS])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in MARKUP_TOKENS])
    return ChatTokenizer(tokenizer)


_INVOKE = re.compile(f"<{re.escape(DSML)}invoke.*?</{re.escape(DSML)}invoke>", re.DOTALL)


def tokenizer_report(tokenizer: ChatTokenizer, texts: Iterable[str]) -> dict[str, float | int]:
    """How ``tokenizer`` cuts ``texts``: tokens per UTF-8 byte overall and in DSML invokes, tokens per invoke,
    and how many texts do not decode back to themselves byte for byte (must be 0)."""
    text_bytes = text_tokens = invokes = invoke_bytes = invoke_tokens = mismatches = count = 0
    for text in texts:
        ids = tokenizer.encode(text)
        count += 1
        mismatches += tokenizer.decode(ids) != text
        text_bytes += len(text.encode("utf-8"))
        text_tokens += len(ids)
        for invoke in _INVOKE.findall(text):
            invokes += 1
            invoke_bytes += len(invoke.encode("utf-8"))
            invoke_tokens += len(tokenizer.encode(invoke))
    return {
        "texts": count,
        "bytes": text_bytes,
        "tokens": text_tokens,
        "tokens_per_byte": text_tokens / max(text_bytes, 1),
        "invokes": invokes,
        "invoke_tokens_per_byte": invoke_tokens / max(invoke_bytes, 1),
        "tokens_per_invoke": invoke_tokens / max(invokes, 1),
        "round_trip_failures": mismatches,
    }
