"""The disk tier of the prefix cache: bit-exact round trips, blocks stored once, longest-prefix lookup, restart,
corruption and foreign files detected, LRU budget, crash leftovers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv4.cache.disk import SessionStore, StoredCheckpoint
from dsv4.cache.prefix import prefix_digests

B = 4  # block_tokens
FINGERPRINT = {"model": "tiny", "dim": 64, "block_tokens": B, "layers": ("window", "csa")}
DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.uint8,
    torch.int64,
    torch.float8_e4m3fn,
    torch.float8_e8m0fnu,
    torch.float4_e2m1fn_x2,
]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bytes viewed as ``dtype``: every bit pattern (NaNs included) must survive."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def block_tensors(seed: int) -> dict[str, torch.Tensor]:
    return {
        "layer1.kv.0": random_tensor((B, 16), torch.float8_e4m3fn, seed),
        "layer1.kv.1": random_tensor((B, 1), torch.float8_e8m0fnu, seed + 1),
        "layer1.index.0": random_tensor((B, 8), torch.float4_e2m1fn_x2, seed + 2),
    }


def state_tensors(seed: int, size: int = 32) -> dict[str, torch.Tensor]:
    return {
        "layer0.window": random_tensor((size,), torch.bfloat16, seed),
        "layer1.frontier": random_tensor((3, 5), torch.float32, seed + 1),
    }


def save(store: SessionStore, ids: list[int], seed: int = 0, size: int = 32) -> str:
    """What the in-memory cache does: the missing full blocks, then the checkpoint of all of ``ids``."""
    n = len(ids)
    digests = prefix_digests(ids, [*range(B, n + 1, B), n])
    block_keys = [digests[(k + 1) * B] for k in range(n // B)]
    for k, key in enumerate(block_keys):
        if not store.has_block(key):
            store.put_block(key, block_tensors(1000 * seed + k))
    store.put_checkpoint(digests[n], n, block_keys, state_tensors(seed, size))
    return digests[n]


def find(store: SessionStore, ids: list[int]) -> StoredCheckpoint | None:
    return store.lookup(prefix_digests(ids, store.lengths()))


def files(store: SessionStore, kind: str) -> list[Path]:
    return sorted((store.directory / kind).glob("*.safetensors"))


def disk_bytes(store: SessionStore) -> int:
    return sum(p.stat().st_size for kind in ("blocks", "checkpoints") for p in files(store, kind))


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    return SessionStore(tmp_path, 1 << 30, FINGERPRINT)


def test_round_trip_is_bit_exact_for_every_dtype(store: SessionStore) -> None:
    tensors = {f"t.{i}": random_tensor((3, 7), dtype, i) for i, dtype in enumerate(DTYPES)}
    tensors["scalar"] = random_tensor((), torch.bfloat16, 50)
    tensors["empty"] = torch.empty(0, 5, dtype=torch.float8_e4m3fn)
    tensors["strided"] = random_tensor((6, 8), torch.float32, 51)[:, ::2]  # not contiguous
    block = {f"b.{dtype}": random_tensor((B, 2), dtype, 60 + i) for i, dtype in enumerate(DTYPES)}
    store.put_block("ab" * 16, block)
    store.put_checkpoint("cd" * 16, 6, ["ab" * 16], tensors)
    loaded = store.load(StoredCheckpoint("cd" * 16, 6, ("ab" * 16,)))
    assert loaded is not None and loaded.num_tokens == 6
    assert loaded.tensors.keys() == tensors.keys() and len(loaded.blocks) == 1
    for name, t in tensors.items():
        assert same_bits(loaded.tensors[name], t.contiguous()), name
    for name, t in block.items():
        assert same_bits(loaded.blocks[0][name], t), name
    with safe_open(files(store, "checkpoints")[0], framework="pt") as f:  # a standard safetensors file
        assert f.get_tensor("t.0").dtype == torch.float32 and f.get_tensor("t.4").dtype == torch.uint8


def test_blocks_shared_between_checkpoints_are_written_once(store: SessionStore) -> None:
    rng = torch.Generator().manual_seed(0)
    ids: list[int] = []
    for turn in range(30):
        ids += torch.randint(0, 1000, (5 + turn % 3,), generator=rng).tolist()
        save(store, ids, seed=turn)
    assert store.num_checkpoints == 30
    assert len(files(store, "checkpoints")) == 30
    assert len(files(store, "blocks")) == len(ids) // B  # each block of the history once
    assert store.total_bytes == disk_bytes(store)


def test_lookup_picks_the_longest_matching_prefix(store: SessionStore) -> None:
    a = list(range(100, 130))
    for n in (8, 16, 24):
        save(store, a[:n], seed=n)
    save(store, list(range(500, 520)), seed=99)  # another conversation, 20 tokens
    assert store.lengths() == {8, 16, 20, 24}
    assert find(store, a).num_tokens == 24
    assert find(store, a[:23]).num_tokens == 16
    diverged = a[:10] + [7] * 20  # differs from token 10 on: only the 8-token prefix matches
    assert find(store, diverged).num_tokens == 8
    assert find(store, list(range(20))) is None
    hit = find(store, a)
    loaded = store.load(hit)
    assert loaded is not None and len(loaded.blocks) == 6
    assert same_bits(loaded.tensors["layer0.window"], state_tensors(24)["layer0.window"])


def test_restart_keeps_checkpoints_and_lru_order(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, 1 << 30, FINGERPRINT)
    convs = [list(range(k * 100, k * 100 + 12)) for k in range(4)]
    for k, ids in enumerate(convs):
        save(store, ids, seed=k)
    for k in (2, 0, 3, 1):  # use order: 2 is now least recently used, then 0
        assert find(store, convs[k]).num_tokens == 12
    total, one = store.total_bytes, store.total_bytes // 4

    again = SessionStore(tmp_path, 1 << 30, FINGERPRINT)
    assert again.num_checkpoints == 4 and again.total_bytes == total
    assert all(find(again, ids).num_tokens == 12 for ids in convs)  # uses in order 0, 1, 2, 3
    assert again.load(find(again, convs[1])) is not None

    # start with room for two conversations: the two least recently used (0 and 2) go
    small = SessionStore(tmp_path, 2 * one + one // 2, FINGERPRINT)
    assert small.num_checkpoints == 2 and small.total_bytes <= 2 * one + one // 2
    assert [find(small, ids) is not None for ids in convs] == [False, True, False, True]
    assert small.total_bytes == disk_bytes(small)


def test_budget_evicts_least_recently_used_and_never_exceeds_it(tmp_path: Path) -> None:
    probe = SessionStore(tmp_path / "probe", 1 << 30, FINGERPRINT)
    save(probe, list(range(10)))
    budget = 3 * probe.total_bytes + 100  # three 10-token conversations
    store = SessionStore(tmp_path / "s", budget, FINGERPRINT)
    convs = [list(range(k * 100, k * 100 + 10)) for k in range(8)]
    kept = convs[0]
    for k, ids in enumerate(convs):
        save(store, ids, seed=k)
        assert find(store, kept) is not None  # used at every turn: never the LRU
        assert store.total_bytes <= budget and disk_bytes(store) == store.total_bytes
    assert store.num_checkpoints == 3
    assert [find(store, ids) is not None for ids in convs] == [True] + [False] * 5 + [True, True]
    assert len(files(store, "blocks")) == 3 * 2  # evicted conversations took their blocks with them


def test_a_checkpoint_larger_than_the_budget_is_not_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SessionStore(tmp_path, 8000, FINGERPRINT)
    save(store, list(range(8)))
    before = store.total_bytes
    with caplog.at_level(logging.WARNING, logger="dsv4.sessions"):
        save(store, list(range(50, 58)), seed=1, size=4096)  # 8 KB of state alone
    assert "over the 8000-byte budget" in caplog.text
    assert store.num_checkpoints == 1 and store.total_bytes == before == disk_bytes(store)
    assert find(store, list(range(8))) is not None


def test_blocks_claimed_for_a_checkpoint_survive_eviction(tmp_path: Path) -> None:
    probe = SessionStore(tmp_path / "probe", 1 << 30, FINGERPRINT)
    save(probe, list(range(12)))
    store = SessionStore(tmp_path / "s", probe.total_bytes + 10, FINGERPRINT)  # room for the 12-token one
    save(store, list(range(8)), size=200)
    # extending it: two blocks found, the third put over budget evicts the 8-token checkpoint, whose blocks
    # the new one was just told are stored
    save(store, list(range(12)))
    assert store.lengths() == {12} and store.total_bytes <= probe.total_bytes + 10
    loaded = store.load(find(store, list(range(12))))
    assert loaded is not None and len(loaded.blocks) == 3


def test_put_checkpoint_with_an_unknown_block_raises(store: SessionStore) -> None:
    with pytest.raises(ValueError, match="not stored"):
        store.put_checkpoint("ab" * 16, 4, ["cd" * 16], state_tensors(0))
    with pytest.raises(ValueError):
        store.put_block("../escape", block_tensors(0))
    assert store.num_checkpoints == 0


def test_discard_deletes_blocks_no_other_checkpoint_uses(store: SessionStore) -> None:
    short = save(store, list(range(8)))
    long = save(store, list(range(16)), seed=1)
    store.discard(long)
    assert store.lengths() == {8} and len(files(store, "blocks")) == 2
    store.discard(short)
    assert store.total_bytes == 0 and not files(store, "blocks") and not files(store, "checkpoints")


def test_interrupted_writes_leave_no_final_file_and_temp_files_are_cleaned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SessionStore(tmp_path, 1 << 30, FINGERPRINT)
    save(store, list(range(8)))
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
        with pytest.raises(OSError):
            save(store, list(range(100, 108)), seed=1)
    assert store.lengths() == {8} and store.total_bytes == disk_bytes(store)
    assert not list((store.directory / "blocks").glob("*.tmp"))
    leftover = store.directory / "checkpoints" / ".abc.safetensors.123.ff.tmp"  # a crash between write and rename
    leftover.write_bytes(b"half a file")
    again = SessionStore(tmp_path, 1 << 30, FINGERPRINT)
    assert not leftover.exists() and again.lengths() == {8}


def corrupt_checkpoint(store: SessionStore, how: str) -> None:
    path = files(store, "checkpoints")[0]
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:-5]
    elif how == "flipped":
        data[-1] ^= 0x01
    elif how == "garbage header":
        data[8:40] = b"\x00not json at all\xff" * 2
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped", "garbage header"])
@pytest.mark.parametrize("when", ["before restart", "after start-up"])
def test_corrupt_files_are_detected_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str, when: str
) -> None:
    ids = list(range(10))
    store = SessionStore(tmp_path, 1 << 30, FINGERPRINT)
    save(store, ids)
    hit = find(store, ids)
    with caplog.at_level(logging.WARNING, logger="dsv4.sessions"):
        corrupt_checkpoint(store, how)
        if when == "before restart":
            store = SessionStore(tmp_path, 1 << 30, FINGERPRINT)
            if how == "flipped":  # the header is intact: found at start-up, caught on load
                assert store.load(find(store, ids)) is None
        else:
            assert store.load(hit) is None
    assert "unusable" in caplog.text
    assert find(store, ids) is None and store.num_checkpoints == 0
    assert not files(store, "checkpoints") and not files(store, "blocks")  # own bad file and its orphans deleted
    assert store.total_bytes == 0
    save(store, ids)  # the prefix can be stored again
    assert store.load(find(store, ids)) is not None


def test_a_missing_or_corrupt_block_drops_the_checkpoints_using_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SessionStore(tmp_path, 1 << 30, FINGERPRINT)
    save(store, list(range(8)))
    save(store, list(range(12)), seed=1)
    save(store, list(range(50, 58)), seed=2)
    digests = prefix_digests(list(range(12)), [8])
    block = store.directory / "blocks" / f"{digests[8]}.safetensors"  # the second block of both 0..7 and 0..11
    with caplog.at_level(logging.WARNING, logger="dsv4.sessions"):
        block.unlink()
        assert store.load(find(store, list(range(12)))) is None
    assert "unusable" in caplog.text
    assert store.lengths() == {8}  # both checkpoints over the block are gone, the other conversation stays
    assert find(store, list(range(12))) is None and find(store, list(range(50, 58))) is not None
    assert store.total_bytes == disk_bytes(store)

    # a block whose data changed: caught on load
    block = store.directory / "blocks" / f"{prefix_digests(list(range(50, 58)), [4])[4]}.safetensors"
    data = bytearray(block.read_bytes())
    data[-1] ^= 0x80
    block.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsv4.sessions"):
        assert store.load(find(store, list(range(50, 58)))) is None
    assert "checksum mismatch" in caplog.text and not block.exists()
    assert store.num_checkpoints == 0 and not files(store, "blocks") and store.total_bytes == 0

    # a block gone while the server was down: its checkpoints are dropped at start-up
    save(store, list(range(12)), seed=1)
    (store.directory / "blocks" / f"{digests[8]}.safetensors").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsv4.sessions"):
        again = SessionStore(tmp_path, 1 << 30, FINGERPRINT)
    assert "lacks block" in caplog.text
    assert again.num_checkpoints == 0 and find(again, list(range(12))) is None
    assert again.total_bytes == disk_bytes(again)


def test_foreign_fingerprints_are_ignored_and_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ids = list(range(12))
    mine = SessionStore(tmp_path, 1 << 30, FINGERPRINT)
    save(mine, ids)
    other_fp = {**FINGERPRINT, "dim": 128}
    other = SessionStore(tmp_path, 1 << 30, other_fp)  # another model sharing the directory
    assert other.num_checkpoints == 0 and find(other, ids) is None and other.total_bytes == 0
    save(other, ids, seed=5)  # same token ids, hence the same keys: no collision with the first model's files
    assert SessionStore(tmp_path, 1 << 30, FINGERPRINT).load(find(mine, ids)) is not None

    # the other model's checkpoint copied over this model's one (same key): logged, ignored, not counted, kept
    foreign = files(other, "checkpoints")[0]
    planted = mine.directory / "checkpoints" / foreign.name
    assert planted.exists()
    planted.write_bytes(foreign.read_bytes())
    with caplog.at_level(logging.WARNING, logger="dsv4.sessions"):
        again = SessionStore(tmp_path, 1 << 30, FINGERPRINT)
    assert "another model's fingerprint" in caplog.text
    assert planted.exists() and again.num_checkpoints == 0 and find(again, ids) is None
    assert again.total_bytes == disk_bytes(again) - planted.stat().st_size

    # replaced by a foreign file after start-up: caught on load, file left in place
    save(again, ids)
    hit = find(again, ids)
    planted.write_bytes(foreign.read_bytes())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsv4.sessions"):
        assert again.load(hit) is None
    assert "another model's fingerprint" in caplog.text and planted.exists()
    assert find(again, ids) is None
