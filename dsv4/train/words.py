"""Word lists and identifiers of the synthetic corpus, and the rule that splits identifiers between the
training and held-out sets.

Every identifier a task is about (a store key, a service, a vault, a person) is built from two words. The
pair, never a single word, decides the split: a held-out key is a combination that no training sample
ever uses, made of words the model and its tokenizer know. That measures what the evaluation is after
(reading the context and copying what it says) rather than how the tokenizer splits words it never saw.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "heldout")
# One word pair in this many belongs to the held-out set.
HELDOUT_ONE_IN = 8


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


ADJECTIVES = _words(
    "amber azure bold brisk calm cedar coral crimson dusty eager frosty gentle golden hollow icy jade keen lunar "
    "misty noble olive pale quiet rapid rusty silver solar stormy swift tidal umber velvet vivid wild young "
    "zesty ashen bright cobalt dawn ember fallow gilded hazel indigo jolly kind lofty mellow nimble opal "
    "proud rosy sandy scarlet sunny tawny upper violet windy"
)
NOUNS = _words(
    "falcon otter maple harbor comet glacier heron island jaguar kestrel lantern meadow nebula orchid pebble "
    "quartz raven summit tundra valley willow zephyr anchor badger canyon delta eagle fjord garnet hornet "
    "iris juniper koala lotus marble nectar osprey panther quill reef sparrow thistle urchin viper walrus "
    "beacon cobra dune fern grove lynx mesa nova pine ridge spruce tiger"
)
FIRST_NAMES = _words(
    "Ada Bruno Chen Dara Elena Farid Greta Hiro Ines Jonas Kavya Liam Maria Nadia Omar Priya Quentin Rosa Sami "
    "Tara Umar Vera Wen Ximena Yusuf Zoe Amara Boris Clara Dmitri Esme Felix Gita Hugo Ivy Jamal Keiko Luca "
    "Mei Nils"
)
LAST_NAMES = _words(
    "Okafor Lindqvist Moreau Tanaka Haddad Novak Petrov Silva Kowalski Nguyen Alvarez Becker Dubois Eriksen "
    "Fischer Garcia Hansen Iyer Jensen Kim Larsen Mensah Nakamura Ortiz Patel Quinn Rossi Schmidt Torres "
    "Ueda Varga Weber Xu Yilmaz Zhang Abbott Brennan Castillo Duarte Ekwueme"
)
DEPARTMENTS = _words("engineering finance legal marketing operations research sales security support design")
CITIES = _words(
    "Lagos Oslo Lyon Osaka Beirut Prague Sofia Porto Krakow Hanoi Lima Hamburg Lille Pune Aarhus Accra Nagoya "
    "Quito Turin Austin"
)
COMPONENTS = _words("api auth billing cache db gateway indexer mailer queue scheduler search storage worker")
HTTP_PATHS = _words("users orders items invoices sessions reports search health metrics login")
VERBS = _words("GET POST PUT DELETE")
# Fields of the small config files that the file task reads.
CONFIG_FIELDS = ("port", "workers", "timeout", "replicas", "max_connections")


def split_of(pair: tuple[str, str]) -> str:
    """The split a two-word identifier belongs to: a fixed hash of the pair, the same on every machine."""
    digest = hashlib.blake2b("\x1f".join(pair).encode("utf-8"), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "little") % HELDOUT_ONE_IN == 0 else "train"
