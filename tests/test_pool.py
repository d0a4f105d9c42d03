"""The engine's paged KV pool (dsv4.cache.pool): the model must compute bit-identical logits through it as
through the contiguous reference cache, its bookkeeping must return every block and slot, and its real
allocation must equal what ``layout`` (and so ``dsv4 costs``) predicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv4.cache import layout
from dsv4.cache.contiguous import ContiguousCache
from dsv4.cache.pool import KVPool, PagedSequence, PoolExhausted
from dsv4.checkpoint import load_checkpoint
from dsv4.config import KV_FP8_BLOCK, LayerKind, ModelConfig
from dsv4.model.batch import Span
from dsv4.model.transformer import Transformer
from dsv4.numerics.formats import fp4_simulate, fp8_simulate
from dsv4.numerics.modes import MODES, get_numerics

DATA = Path(__file__).parent / "data" / "reference"
CKPT = DATA / "ckpt"
Models = dict[str, Transformer]
Vectors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig.from_file(CKPT)


@pytest.fixture(scope="module")
def vectors() -> Vectors:
    return load_file(DATA / "vectors.safetensors")


@pytest.fixture(scope="module")
def models(config: ModelConfig) -> Models:
    """Built on first use per mode: loading is cheap, but not every test needs every mode."""

    class Lazy(dict):
        def __missing__(self, mode: str) -> Transformer:
            model = Transformer(config, mode)
            load_checkpoint(model.state_dict(), CKPT, progress=False)
            self[mode] = model
            return model

    return Lazy()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_bit_identical(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(_bits(a), _bits(b)), f"{what}: max difference {(a.float() - b.float()).abs().max()}"


def _contiguous(model: Transformer) -> ContiguousCache:
    return ContiguousCache(model.n_cache_layers, model.config.window_size, model.numerics.dtype)


def _assert_same_state(config: ModelConfig, ref: ContiguousCache, seq: PagedSequence) -> None:
    """Beyond the logits: the stored entries and window rows decode to exactly the contiguous values."""
    end = seq.num_tokens
    for spec in config.layers:
        a, b = ref.layer(spec.index), seq.layer(spec.index)
        _assert_bit_identical(a.window(end), b.window(end), f"layer {spec.index} window")
        names = {LayerKind.CSA: ("kv", "index"), LayerKind.HCA: ("kv",)}.get(spec.kind, ())
        for name in names:
            assert a.num_entries(name) == b.num_entries(name)
            if a.num_entries(name) == 0:
                continue
            _assert_bit_identical(a.entries(name), b.entries(name), f"layer {spec.index} {name}")
            rows = torch.randperm(a.num_entries(name), generator=torch.Generator().manual_seed(0))[:7]
            some_a, some_b = a.entries(name, rows), b.entries(name, rows)
            _assert_bit_identical(some_a, some_b, f"layer {spec.index} {name} rows")


def _run_both(
    model: Transformer, pool: KVPool, tokens: torch.Tensor, chunks: list[int], decode: torch.Tensor
) -> PagedSequence:
    """Feed ``tokens`` in ``chunks`` then ``decode`` one by one, through both caches; compare every call."""
    assert sum(chunks) == len(tokens)
    ref, seq = _contiguous(model), pool.new_sequence()
    pieces = [*torch.split(tokens, chunks), *decode.split(1)]
    pos = 0
    for i, piece in enumerate(pieces):
        pool.reserve(seq, len(piece))
        want = model(piece, [Span(0, len(piece), pos, ref)]).logits
        got = model(piece, [Span(0, len(piece), pos, seq)]).logits
        _assert_bit_identical(got, want, f"call {i} at position {pos}")
        pos += len(piece)
        assert seq.num_tokens == pos
        assert len(seq.blocks) == layout.blocks_for(pos, pool.block_tokens)
    _assert_same_state(model.config, ref, seq)
    return seq


def _awkward(rows: int, dims: int, g: torch.Generator) -> torch.Tensor:
    """Values over a wide range of magnitudes, with all-zero rows and blocks, and signed zeros."""
    x = torch.randn(rows, dims, generator=g) * 2.0 ** torch.randint(-40, 40, (rows, 1), generator=g)
    x[0] = 0
    x[1, :64] = -0.0
    x[2, 32:96] = 0
    return x


@pytest.mark.parametrize("mode", list(MODES))
def test_stored_rows_decode_exactly(config: ModelConfig, mode: str) -> None:
    """The compact formats are lossless for the values the model produces in each mode."""
    numerics = get_numerics(mode)
    g = torch.Generator().manual_seed(1)
    nope = config.nope_head_dim

    def kv_like(rows: int) -> torch.Tensor:
        x = _awkward(rows, config.head_dim, g).to(numerics.dtype)
        if not numerics.simulate:
            return x
        return torch.cat([fp8_simulate(x[:, :nope], KV_FP8_BLOCK), x[:, nope:]], -1)

    keys = _awkward(32, config.index_head_dim, g).to(numerics.dtype)
    keys = fp4_simulate(keys) if numerics.simulate else keys
    entries, window = kv_like(32), kv_like(128)
    pool = KVPool(config, mode, num_blocks=1, block_tokens=128, max_sequences=1)
    seq = pool.new_sequence()
    pool.reserve(seq, 128)
    csa = seq.layer(next(s.index for s in config.layers if s.kind is LayerKind.CSA))
    csa.append_entries("kv", entries)
    csa.append_entries("index", keys)
    csa.write_window(window, 0)
    _assert_bit_identical(csa.entries("kv"), entries, "entries")
    _assert_bit_identical(csa.entries("index"), keys, "indexer keys")
    _assert_bit_identical(csa.entries("index", torch.tensor([5, 0, 31])), keys[[5, 0, 31]], "some keys")
    _assert_bit_identical(csa.window(128), window[1:], "window")
    with pytest.raises(IndexError, match="32 entries"):
        csa.entries("kv", torch.tensor([3, 32]))


@pytest.mark.parametrize(
    ("mode", "block_tokens", "chunks", "n_decode"),
    [
        ("bf16_official", 128, [129, 6], 1),  # crosses block, 128- and 4-token boundaries (bf16 is slow)
        ("fp32_sim", 256, [260], 2),
    ],
)
def test_simulated_modes_bit_identical(
    models: Models,
    vectors: Vectors,
    mode: str,
    block_tokens: int,
    chunks: list[int],
    n_decode: int,
) -> None:
    model = models[mode]
    pool = KVPool(model.config, mode, num_blocks=4, block_tokens=block_tokens, max_sequences=2)
    prompt, decode = vectors["prompt0.input_ids"][: sum(chunks)], vectors["prompt0.decode_ids"][:n_decode]
    seq = _run_both(model, pool, prompt, chunks, decode)
    pool.free(seq)
    assert pool.num_free_blocks == 4 and pool.num_free_slots == 2 and pool.used_bytes == 0


def test_long_prompt_and_decode(models: Models, vectors: Vectors) -> None:
    """The 621-token prompt in one prefill, then decode; also matches the reference vectors' first rows."""
    model = models["fp32_nosim"]
    pool = KVPool(model.config, "fp32_nosim", num_blocks=3)
    ref, seq = _contiguous(model), pool.new_sequence()
    ids, decode = vectors["prompt1.input_ids"], vectors["prompt1.decode_ids"][:3]
    pool.reserve(seq, len(ids))
    rows = [model(ids, [Span(0, len(ids), 0, seq)]).logits]
    want = model(ids, [Span(0, len(ids), 0, ref)]).logits
    _assert_bit_identical(rows[0], want, "prefill")
    for j, token in enumerate(decode.split(1)):
        pool.reserve(seq, 1)
        rows.append(model(token, [Span(0, 1, len(ids) + j, seq)]).logits)
        want = model(token, [Span(0, 1, len(ids) + j, ref)]).logits
        _assert_bit_identical(rows[-1], want, f"decode {j}")
    _assert_same_state(model.config, ref, seq)
    expected = vectors["prompt1.fp32_nosim.logits"][: len(rows)]
    assert (torch.cat(rows) - expected).abs().max() < 5e-4


def test_chunked_prefill_small_blocks(models: Models, vectors: Vectors) -> None:
    """Chunks ending just before, on and after 4-, 128- and block boundaries (block_tokens = 128)."""
    model = models["fp32_nosim"]
    pool = KVPool(model.config, "fp32_nosim", num_blocks=3, block_tokens=128, max_sequences=1)
    ids = vectors["prompt0.input_ids"][:262]
    seq = _run_both(model, pool, ids, [127, 1, 2, 126, 6], vectors["prompt0.decode_ids"][:1])
    assert pool.num_free_blocks == 0
    pool.free(seq)
    assert pool.num_free_blocks == 3 and pool.num_free_slots == 1


def test_two_sequences_in_one_forward(models: Models, vectors: Vectors) -> None:
    """A decode of one sequence and a prefill of another in the same batch, at different positions."""
    model = models["fp32_nosim"]
    pool = KVPool(model.config, "fp32_nosim", num_blocks=4, block_tokens=128, max_sequences=2)
    a_ids, b_ids = vectors["prompt0.input_ids"][:140], vectors["prompt1.input_ids"][:150]
    ref_a, ref_b = _contiguous(model), _contiguous(model)
    seq_a, seq_b = pool.new_sequence(), pool.new_sequence()
    pool.reserve(seq_a, len(a_ids))
    _assert_bit_identical(
        model(a_ids, [Span(0, len(a_ids), 0, seq_a)]).logits,
        model(a_ids, [Span(0, len(a_ids), 0, ref_a)]).logits,
        "first prefill",
    )
    batch = torch.cat([b_ids, vectors["prompt0.decode_ids"][:1]])
    pool.reserve(seq_b, len(b_ids))
    pool.reserve(seq_a, 1)
    got = model(batch, [Span(0, len(b_ids), 0, seq_b), Span(len(b_ids), 1, len(a_ids), seq_a)]).logits
    want = model(batch, [Span(0, len(b_ids), 0, ref_b), Span(len(b_ids), 1, len(a_ids), ref_a)]).logits
    _assert_bit_identical(got, want, "mixed batch")
    assert seq_a.num_tokens == 141 and seq_b.num_tokens == 150
    assert set(seq_a.blocks).isdisjoint(seq_b.blocks)
    _assert_same_state(model.config, ref_a, seq_a)
    _assert_same_state(model.config, ref_b, seq_b)
    pool.free(seq_a)
    pool.free(seq_b)
    assert pool.num_free_blocks == 4 and pool.num_free_slots == 2


@pytest.mark.parametrize("mode", ["fp32_nosim", "bf16_official"])
def test_decode_group_over_fragmented_blocks(models: Models, vectors: Vectors, mode: str) -> None:
    """Three sequences prefilled in interleaved chunks (so their block tables are not runs), then decoded
    together: the group's reads and writes, and the indexer's reads of the keys in place through the block
    tables, give what the contiguous caches give for the same batch, bit for bit."""
    model = models[mode]
    pool = KVPool(model.config, mode, num_blocks=12, block_tokens=128, max_sequences=3)
    # decode then completes an HCA entry (position 255) and the first CSA entry of the shortest (position 3)
    lengths = [254, 200, 2]
    prompts = [vectors[f"prompt{i % 2}.input_ids"][:n] for i, n in enumerate(lengths, start=1)]
    seqs = [pool.new_sequence() for _ in prompts]
    refs = [_contiguous(model) for _ in prompts]
    for lo in range(0, max(lengths), 64):
        for ids, seq, ref in zip(prompts, seqs, refs, strict=True):
            piece = ids[lo : lo + 64]
            if len(piece):
                pool.reserve(seq, len(piece))
                _assert_bit_identical(
                    model(piece, [Span(0, len(piece), lo, seq)]).logits,
                    model(piece, [Span(0, len(piece), lo, ref)]).logits,
                    f"prefill at {lo}",
                )
    assert seqs[0].blocks != list(range(seqs[0].blocks[0], seqs[0].blocks[0] + len(seqs[0].blocks)))
    csa = next(spec.index for spec in model.config.layers if spec.kind is LayerKind.CSA)
    keys = seqs[0].layer(csa).key_rows("index")  # plain values or FP4 codes: read where they are stored
    assert keys.rows.data_ptr() == pool.stores[csa].entries["index"].tensors[0].data_ptr()
    tokens = vectors["prompt0.decode_ids"][:3]
    for step, token in enumerate(tokens):
        spans = [Span(i, 1, len(ids) + step, seq) for i, (ids, seq) in enumerate(zip(prompts, seqs, strict=True))]
        ref_spans = [Span(s.start, 1, s.pos0, ref) for s, ref in zip(spans, refs, strict=True)]
        for seq in seqs:
            pool.reserve(seq, 1)
        batch = token.repeat(3)
        _assert_bit_identical(model(batch, spans).logits, model(batch, ref_spans).logits, f"decode {step}")
    for ref, seq in zip(refs, seqs, strict=True):
        _assert_same_state(model.config, ref, seq)


def test_fork_shares_full_blocks(models: Models, vectors: Vectors) -> None:
    """A fork continues exactly like its source; full blocks are shared, the partial one copied."""
    model = models["fp32_nosim"]
    pool = KVPool(model.config, "fp32_nosim", num_blocks=5, block_tokens=128, max_sequences=2)
    ids, decode = vectors["prompt0.input_ids"][:131], vectors["prompt0.decode_ids"]
    ref, src = _contiguous(model), pool.new_sequence()
    pool.reserve(src, len(ids))
    model(ids, [Span(0, len(ids), 0, ref)])
    model(ids, [Span(0, len(ids), 0, src)])
    fork = pool.fork(src)
    assert fork.num_tokens == src.num_tokens == 131
    assert fork.blocks[0] == src.blocks[0] and fork.blocks[1] != src.blocks[1]
    assert [pool.refcount(b) for b in src.blocks] == [2, 1] and pool.refcount(fork.blocks[1]) == 1
    with pytest.raises(PoolExhausted):  # no slot left; nothing may change
        pool.fork(src)
    assert pool.num_free_blocks == 2 and pool.refcount(src.blocks[0]) == 2

    want = model(decode[:1], [Span(0, 1, 131, ref)]).logits
    for seq in (src, fork):  # the same token through both: the fork's copy must be exact
        pool.reserve(seq, 1)
        _assert_bit_identical(model(decode[:1], [Span(0, 1, 131, seq)]).logits, want, "after fork")
    # diverging continuations do not disturb each other
    model(decode[1:2], [Span(0, 1, 132, fork)])
    _assert_bit_identical(
        model(decode[2:3], [Span(0, 1, 132, src)]).logits,
        model(decode[2:3], [Span(0, 1, 132, ref)]).logits,
        "source after the fork diverged",
    )
    pool.free(src)
    assert pool.refcount(fork.blocks[0]) == 1 and pool.num_free_blocks == 3
    pool.free(fork)
    assert pool.num_free_blocks == 5 and pool.num_free_slots == 2 and pool.used_bytes == 0


def test_fork_without_sharing_copies_every_block(models: Models, vectors: Vectors) -> None:
    model = models["fp32_nosim"]
    pool = KVPool(model.config, "fp32_nosim", num_blocks=5, block_tokens=128, max_sequences=3)
    ids, decode = vectors["prompt0.input_ids"][:131], vectors["prompt0.decode_ids"]
    src = pool.new_sequence()
    pool.reserve(src, len(ids))
    model(ids, [Span(0, len(ids), 0, src)])
    copy = pool.fork(src, share_blocks=False)
    assert not set(copy.blocks) & set(src.blocks) and len(copy.blocks) == 2
    assert all(pool.refcount(b) == 1 for b in [*src.blocks, *copy.blocks])
    with pytest.raises(PoolExhausted):  # a slot is free, but only one of the two blocks a copy needs
        pool.fork(src, share_blocks=False)
    assert pool.num_free_blocks == 1 and pool.num_free_slots == 1
    logits = []
    for seq in (src, copy):
        pool.reserve(seq, 1)
        logits.append(model(decode[:1], [Span(0, 1, 131, seq)]).logits)
    _assert_bit_identical(logits[1], logits[0], "a copied fork continues like its source")
    for seq in (src, copy):
        pool.free(seq)
    assert pool.num_free_blocks == 5 and pool.used_bytes == 0


def test_reserve_when_full_changes_nothing(config: ModelConfig) -> None:
    pool = KVPool(config, "fp32_nosim", num_blocks=2, block_tokens=128, max_sequences=2)
    a, b = pool.new_sequence(), pool.new_sequence()
    with pytest.raises(PoolExhausted):
        pool.new_sequence()
    assert pool.blocks_needed(a, 129) == 2 and pool.can_grow(a, 256) and not pool.can_grow(a, 257)
    with pytest.raises(PoolExhausted):
        pool.reserve(a, 257)
    assert a.blocks == [] and pool.num_free_blocks == 2
    pool.reserve(a, 200)
    pool.reserve(a, 200)  # relative to the tokens held: already covered
    assert len(a.blocks) == 2 and pool.num_free_blocks == 0 and pool.blocks_needed(b, 1) == 1
    used = pool.used_bytes
    with pytest.raises(PoolExhausted):
        pool.reserve(b, 1)
    assert b.blocks == [] and pool.used_bytes == used and pool.free_bytes == pool.total_bytes - used
    pool.free(a)
    for use in (pool.free, pool.fork, lambda seq: pool.reserve(seq, 1)):
        with pytest.raises(ValueError, match="freed"):
            use(a)
    pool.reserve(b, 1)
    assert pool.num_free_blocks == 1 and pool.num_free_slots == 1


def test_misuse_is_caught(config: ModelConfig) -> None:
    pool = KVPool(config, "bf16_official", num_blocks=1, block_tokens=128, max_sequences=1)
    seq = pool.new_sequence()
    kv = torch.zeros(1, config.head_dim, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="reserve"):
        seq.layer(0).write_window(kv, 0)
    with pytest.raises(IndexError, match="MTP"):
        seq.layer(config.n_layers)
    pool.reserve(seq, 128)
    seq.layer(0).write_window(kv.expand(128, -1), 0)
    with pytest.raises(AssertionError, match="reserved"):
        seq.layer(0).write_window(kv, 128)
    csa = next(s.index for s in config.layers if s.kind is LayerKind.CSA)
    entries = torch.zeros(33, config.head_dim, dtype=torch.bfloat16)  # 32 entries fit in one 128-token block
    with pytest.raises(AssertionError, match="reserved"):
        seq.layer(csa).append_entries("kv", entries)
    with pytest.raises(ValueError, match="continue"):
        seq.layer(0).window(5)
    pool.free(seq)
    with pytest.raises(ValueError, match="freed"):
        seq.layer(0)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("which", ["reference", "v4-flash"])
def test_allocation_equals_layout(config: ModelConfig, mode: str, which: str) -> None:
    """What the engine allocates is what ``dsv4 costs`` computes, byte for byte."""
    cfg = config if which == "reference" else ModelConfig.preset("v4-flash")
    num_blocks, max_sequences = (3, 2) if which == "reference" else (2, 1)
    pool = KVPool(cfg, mode, num_blocks=num_blocks, max_sequences=max_sequences)
    block = layout.block_bytes(cfg, mode, pool.block_tokens).total
    state = layout.state_bytes_per_sequence(cfg, mode).total
    assert pool.allocated_bytes() == pool.total_bytes == block * num_blocks + state * max_sequences
    assert pool.bytes_per_token() == layout.bytes_per_token(cfg, mode)
    seq = pool.new_sequence()
    pool.reserve(seq, 1)
    assert pool.used_bytes == layout.sequence_bytes(cfg, mode, 1, pool.block_tokens)


def test_replica_replays_the_journal(models: Models, vectors: Vectors) -> None:
    """A tensor-parallel rank's pool stays identical to rank 0's by replaying its recorded allocations (new,
    reserve, fork with shared and copied blocks, free, import) and running the same forwards: every stored
    byte and every count match, and a replica that would allocate differently says so."""
    model = models["fp32_nosim"]
    main, replica = (KVPool(model.config, "fp32_nosim", num_blocks=6, block_tokens=128, max_sequences=4) for _ in "ab")
    main.journal = []
    ids = vectors["prompt0.input_ids"]

    def forward(seq: PagedSequence, tokens: torch.Tensor, pos0: int) -> None:
        """Replay what ``main`` recorded so far, then run the same forward on both pools."""
        assert main.journal is not None
        for op in main.journal:
            replica.replay(op)
        main.journal.clear()
        model(tokens, [Span(0, len(tokens), pos0, seq)])
        model(tokens, [Span(0, len(tokens), pos0, replica.sequence(seq.slot))])

    first = main.new_sequence()
    main.reserve(first, 131)
    forward(first, ids[:131], 0)
    fork = main.fork(first)  # one shared block, the partial one copied
    main.reserve(fork, 1)
    forward(fork, ids[131:132], 131)
    main.free(first)
    blocks = [main.export_block(b) for b in fork.blocks[:1]]
    imported = main.import_sequence(fork.num_tokens, blocks, main.export_state(fork))
    main.reserve(imported, 2)
    forward(imported, ids[132:134], 132)
    for op in main.journal:
        replica.replay(op)

    for slot in (fork.slot, imported.slot):
        mine, theirs = main.sequence(slot), replica.sequence(slot)
        assert mine.blocks == theirs.blocks
        for a, b in zip(mine.layers, theirs.layers, strict=True):
            assert (a.end, a.pending, a.counts) == (b.end, b.pending, b.counts)
            _assert_bit_identical(a.window(a.end), b.window(b.end), "window")
            for name in a.counts:
                _assert_bit_identical(a.entries(name), b.entries(name), name)
            for name in a.pending:
                for x, y in zip(a.frontier(name), b.frontier(name), strict=True):
                    _assert_bit_identical(x, y, f"{name} frontier")
    assert main._refcounts == replica._refcounts and main.num_free_slots == replica.num_free_slots

    main.new_sequence()
    replica.new_sequence()  # out of step: the next replay must not silently pick another slot
    with pytest.raises(RuntimeError, match="diverged"):
        replica.replay(main.journal[-1])


@pytest.mark.parametrize("kind", [LayerKind.CSA, LayerKind.HCA])
def test_the_cache_keeps_exactly_the_frontier_a_later_entry_needs(config: ModelConfig, kind: LayerKind) -> None:
    """``extend_frontier`` (paged and contiguous) returns every row from the first kept position and then keeps
    the rows of positions [frontier_start(end), end): the window in progress and, for ratio 4, the previous
    one - whatever the chunking of the positions."""
    spec = next(s for s in config.layers if s.kind is kind)
    ratio = spec.compress_ratio
    width = next(f for f in layout.frontiers(config, spec) if f.role == "attention").shape[1]
    pool = KVPool(config, "fp32_nosim", num_blocks=4, block_tokens=128, max_sequences=1)
    contiguous = ContiguousCache(spec.index + 1, config.window_size, torch.float32).layer(spec.index)
    caches = [pool.new_sequence().layer(spec.index), contiguous]
    fed = torch.randn(3 * ratio + 7, 2, width)
    for cache in caches:
        pos = 0
        for n in [1, 2, ratio - 1, 1, ratio + 2, 1, 1, ratio, 1]:
            n = min(n, len(fed) - pos)
            kv, score, start = cache.extend_frontier("kv", fed[pos : pos + n, 0], fed[pos : pos + n, 1], pos, ratio)
            pos += n
            assert start == layout.frontier_start(ratio, pos - n)
            assert torch.equal(kv, fed[start:pos, 0]) and torch.equal(score, fed[start:pos, 1])
            kept_kv, kept_score = cache.frontier("kv")
            first = layout.frontier_start(ratio, pos)
            assert torch.equal(kept_kv, fed[first:pos, 0]) and torch.equal(kept_score, fed[first:pos, 1])
