"""The KV/FLOPs calculator reproduces the V4 report's headline ratios (architecture.md §13), and the cache
layout gives the hand-computed byte counts that the engine's pool will allocate."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv4 import costs
from dsv4.cache import layout
from dsv4.cli import main
from dsv4.config import ModelConfig, load_config

TINY_DIR = Path(__file__).parent / "data" / "reference" / "ckpt"
GIB = 2**30


@pytest.fixture(scope="module")
def flash() -> ModelConfig:
    return load_config("v4-flash")


@pytest.fixture(scope="module")
def pro() -> ModelConfig:
    return load_config("v4-pro")


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return load_config(str(TINY_DIR))


def _pct(x: float) -> int:
    return round(100 * x)


# ------------------------------------------------------------------------------------------ headline claims
def test_published_ratios_at_1m() -> None:
    report = costs.costs_report({"v4-flash": load_config("v4-flash"), "v4-pro": load_config("v4-pro")}, 10**6)
    pro, flash = report["models"]["v4-pro"], report["models"]["v4-flash"]
    assert _pct(pro["vs_v3.2"]["flops"]) == 27
    assert _pct(pro["vs_v3.2"]["kv"]) == 10
    assert _pct(flash["vs_v3.2"]["flops"]) == 10
    assert _pct(flash["vs_v3.2"]["kv"]) == 7
    assert _pct(pro["vs_gqa8"]["kv"]) == 2
    assert _pct(flash["vs_gqa8"]["kv"]) == 2
    # the §13.2 table's unrounded values, so a compensating pair of errors cannot pass
    assert round(100 * pro["vs_v3.2"]["flops"], 1) == 26.7
    assert round(100 * flash["vs_v3.2"]["flops"], 1) == 10.0
    assert round(100 * pro["vs_gqa8"]["kv"], 2) == 1.99
    assert round(100 * flash["vs_gqa8"]["kv"], 2) == 1.97


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        # L, {model: (params, core raw, indexer raw, FP8-equivalent)} in GFLOP, from architecture.md §13.2
        (10**6, {"v3.2": (74, 34.8, 1007.2, 1150.8), "v4-pro": (98, 73.6, 123.8, 307.1),
                 "v4-flash": (26, 22.6, 86.7, 114.6)}),
        (2**20, {"v3.2": (74, 34.8, 1056.2, 1199.8), "v4-pro": (98, 76.7, 129.9, 316.3),
                 "v4-flash": (26, 23.6, 90.9, 118.7)}),
    ],
)  # fmt: skip
def test_flops_table(context: int, expected: dict[str, tuple[float, ...]]) -> None:
    got = {"v3.2": costs.V32.flops(context)}
    for name in ("v4-pro", "v4-flash"):
        got[name] = costs.model_costs(name, load_config(name), context).flops
    for name, (params, core, indexer, total) in expected.items():
        f = got[name]
        assert [round(float(x) / 1e9, 1) for x in (f.parameters, f.core_attention, f.indexer, f.fp8_equivalent)] == [
            params,
            core,
            indexer,
            total,
        ], name


def test_kv_totals_at_2_20(flash: ModelConfig, pro: ModelConfig) -> None:
    v32 = sum(costs.V32.kv_bytes_per_token().values())
    assert round(v32 * 2**20 / GIB, 1) == 46.9
    assert round(float(layout.bytes_per_token(pro, layout.PAPER).total) * 2**20 / GIB, 2) == 4.85
    assert round(float(layout.bytes_per_token(flash, layout.PAPER).total) * 2**20 / GIB, 2) == 3.39
    # the official code's all-bf16 cache: about 9.6 GiB for Pro
    assert round(float(layout.bytes_per_token(pro, layout.OFFICIAL_CODE).total) * 2**20 / GIB, 1) == 9.6


def test_per_layer_bytes(flash: ModelConfig, pro: ModelConfig) -> None:
    assert layout.entry_format(pro, layout.PAPER).nbytes == 576
    assert layout.indexer_key_format(pro, layout.PAPER).nbytes == 68
    for config, n_csa, n_hca in ((flash, 21, 20), (pro, 30, 31)):
        per_token = layout.bytes_per_token(config, layout.PAPER)
        assert (per_token.csa_entries + per_token.indexer_keys) / n_csa == 161
        assert per_token.hca_entries / n_hca == Fraction(9, 2)
    assert layout.bytes_per_token(pro, layout.PAPER).total == Fraction(9939, 2)  # 4,969.5
    assert layout.bytes_per_token(flash, layout.PAPER).total == 3471
    assert costs.V32.entry_bytes + costs.V32.indexer_key_bytes == 788
    assert sum(costs.V32.kv_bytes_per_token().values()) == 788 * 61
    assert costs.gqa8_kv_bytes_per_token(1) == 4096
    assert layout.bytes_per_token(pro, layout.OFFICIAL_CODE).total == 9848
    assert layout.bytes_per_token(flash, layout.OFFICIAL_CODE).total == 6880


def test_dsv4_storage_per_token(flash: ModelConfig) -> None:
    # bf16_official: 448 FP8 + 7 scales + 64 bf16 = 583 B per entry; 64 + 4 = 68 B per indexer key
    assert layout.entry_format(flash, "bf16_official").nbytes == 583
    assert layout.entry_format(flash, "fp32_sim").nbytes == 448 + 7 + 256
    assert layout.entry_format(flash, "fp32_nosim").nbytes == 2048
    assert layout.indexer_key_format(flash, "fp32_sim").nbytes == 68
    assert layout.indexer_key_format(flash, "fp32_nosim").nbytes == 512
    assert layout.bytes_per_token(flash, "bf16_official").total == 21 * Fraction(583 + 68, 4) + 20 * Fraction(583, 128)


def test_activated_params(flash: ModelConfig, pro: ModelConfig, tiny: ModelConfig) -> None:
    flash_params, pro_params = costs.count_params(flash), costs.count_params(pro)
    assert round(flash_params.total / 1e9) == 284
    assert round(flash_params.activated / 1e9) == 13
    assert round(pro_params.total / 1e12, 1) == 1.6
    assert round(pro_params.activated / 1e9) == 49
    # the tiny checkpoint holds exactly the counted tensors (FP4 experts pack two values per byte)
    stored = 0
    for shard in sorted(TINY_DIR.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if name.startswith("mtp.") or name.endswith(".scale") or name.endswith("tid2eid"):
                    continue
                piece = f.get_slice(name)
                numel = torch.Size(piece.get_shape()).numel()
                stored += 2 * numel if piece.get_dtype() == "I8" else numel
    assert costs.count_params(tiny).total == stored
    # a model directory has no published figure, so its parameter FLOPs use the count from its config
    mc = costs.model_costs(str(TINY_DIR), tiny, 4096)
    assert mc.activated_source == "config"
    assert mc.flops.parameters == 2 * costs.count_params(tiny).activated


# ---------------------------------------------------------------------------------- layout, tiny config
def test_layout_tiny(tiny: ModelConfig) -> None:
    assert [s.kind.value for s in tiny.layers] == ["window", "csa", "hca", "window", "csa"]
    # head_dim 256 = 192 nope + 64 rope: 192 FP8 + 3 E8M0 + 64 x (2 | 4) B; index_head_dim 128
    entry = {"bf16_official": 323, "fp32_sim": 451, "fp32_nosim": 1024, "paper": 320, "official_code": 512}
    key = {"bf16_official": 68, "fp32_sim": 68, "fp32_nosim": 512, "paper": 68, "official_code": 256}
    for mode in layout.ALL_MODES:
        assert layout.entry_format(tiny, mode).nbytes == entry[mode]
        assert layout.window_row_format(tiny, mode).nbytes == entry[mode]
        assert layout.indexer_key_format(tiny, mode).nbytes == key[mode]

    per_token = layout.bytes_per_token(tiny, "bf16_official")
    assert per_token.csa_entries == Fraction(2 * 323, 4)
    assert per_token.indexer_keys == 34
    assert per_token.hca_entries == Fraction(323, 128)
    assert per_token.total == Fraction(25347, 128)  # 198.0234375

    # compressor frontiers: CSA attention [8, 512], CSA indexer [8, 256], HCA [128, 256]; kv + score in fp32
    shapes = [(f.layer, f.role, f.shape) for spec in tiny.layers for f in layout.frontiers(tiny, spec)]
    assert shapes == [
        (1, "attention", (8, 512)),
        (1, "indexer", (8, 256)),
        (2, "attention", (128, 256)),
        (4, "attention", (8, 512)),
        (4, "indexer", (8, 256)),
    ]
    state = layout.state_bytes_per_sequence(tiny, "bf16_official")
    assert state.window_rows == 5 * 128
    assert state.window_ring == 5 * 128 * 323
    assert state.frontiers == 2 * 4 * (2 * (8 * 512 + 8 * 256) + 128 * 256)  # 360,448
    assert state.total == 567_168

    block = layout.block_bytes(tiny, "bf16_official", 256)
    assert (block.csa_entries, block.indexer_keys, block.hca_entries) == (2 * 64 * 323, 2 * 64 * 68, 2 * 323)
    assert block.total == 50_694
    assert layout.block_bytes(tiny, "fp32_nosim", 128).total == 2 * 32 * (1024 + 512) + 1024


@pytest.mark.parametrize("mode", layout.ALL_MODES)
@pytest.mark.parametrize("preset", ["tiny", "v4-flash", "v4-pro"])
def test_block_matches_per_token(mode: str, preset: str, tiny: ModelConfig) -> None:
    config = tiny if preset == "tiny" else load_config(preset)
    for block_tokens in (128, 256, 1024):
        assert layout.block_bytes(config, mode, block_tokens).total == (
            layout.bytes_per_token(config, mode).total * block_tokens
        )


def test_sequence_bytes(tiny: ModelConfig) -> None:
    state, block = 567_168, 50_694
    for context, blocks in ((0, 0), (1, 1), (255, 1), (256, 1), (257, 2), (4096, 16), (100_000, 391)):
        assert layout.blocks_for(context) == blocks
        assert layout.sequence_bytes(tiny, "bf16_official", context) == state + blocks * block
    assert layout.sequence_bytes(tiny, "bf16_official", 1000, block_tokens=128) == state + 8 * block // 2


def test_segments_allocate_their_bytes(tiny: ModelConfig) -> None:
    """Tensors allocated from the row formats hold exactly the bytes the calculator counts."""
    for mode in layout.ALL_MODES:
        for row in (layout.entry_format(tiny, mode), layout.indexer_key_format(tiny, mode)):
            tensors = [torch.empty((7, s.numel), dtype=s.torch_dtype) for s in row.segments]
            assert sum(t.nbytes for t in tensors) == 7 * row.nbytes
        for spec in tiny.layers:
            for f in layout.frontiers(tiny, spec):
                assert 2 * torch.empty(f.shape, dtype=layout.FRONTIER_DTYPE).nbytes == f.nbytes
    sim = layout.entry_format(tiny, "bf16_official").segments
    assert [(s.name, s.values, s.torch_dtype) for s in sim] == [
        ("nope", 192, torch.float8_e4m3fn),
        ("nope_scale", 3, torch.float8_e8m0fnu),
        ("rope", 64, torch.bfloat16),
    ]
    key = layout.indexer_key_format(tiny, "fp32_sim").segments
    assert [(s.values, s.numel, s.torch_dtype) for s in key] == [
        (128, 64, torch.float4_e2m1fn_x2),
        (4, 4, torch.float8_e8m0fnu),
    ]


def test_layout_errors(tiny: ModelConfig) -> None:
    with pytest.raises(ValueError, match="unknown cache mode"):
        layout.bytes_per_token(tiny, "fp16")
    for bad in (0, 100, 192):
        with pytest.raises(ValueError, match="multiple of 128"):
            layout.block_bytes(tiny, "bf16_official", bad)
    assert layout.entries_per_block(tiny.layers[0], 256) == 0
    assert layout.entries_per_block(tiny.layers[1], 256) == 64
    assert layout.entries_per_block(tiny.layers[2], 256) == 2


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    ("text", "tokens"),
    [("131072", 131072), ("128K", 131072), ("128k", 131072), ("1M", 2**20), ("1e6", 10**6),
     ("1_000_000", 10**6), ("1.5M", 3 * 2**19), (" 4096 ", 4096)],
)  # fmt: skip
def test_parse_context(text: str, tokens: int) -> None:
    assert costs.parse_context(text) == tokens


@pytest.mark.parametrize("text", ["12Q", "", "0", "-5", "1.5", "1.0001K", "M", "1MM", "1e-3"])
def test_parse_context_errors(text: str) -> None:
    with pytest.raises(ValueError, match="--context"):
        costs.parse_context(text)


def test_cli_bad_context(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["costs", "--context", "12Q"]) == 2
    assert "--context '12Q'" in capsys.readouterr().err


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["costs", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["context"] == 10**6
    assert set(data["models"]) == {"v4-flash", "v4-pro"}
    for model in data["models"].values():
        assert isinstance(model["kv_bytes_per_token"], float | int)
        assert isinstance(model["flops_per_token"], float | int)
        assert set(model["vs_v3.2"]) == {"kv", "flops"}
        assert set(model["vs_gqa8"]) == {"kv"}
        assert 0 < model["vs_v3.2"]["kv"] < 1 and 0 < model["vs_gqa8"]["kv"] < 1
        assert set(model["storage"]) == set(layout.ALL_MODES)
    assert data["models"]["v4-flash"]["kv_bytes_per_token"] == 3471
    assert data["models"]["v4-flash"]["baselines"]["gqa8"] == {"layers": 43, "kv_bytes_per_token": 43 * 4096}


def test_cli_json_model_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["costs", "--json", "--model", str(TINY_DIR), "--context", "128K"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["context"] == 131072
    model = data["models"][str(TINY_DIR)]
    assert model["storage"]["bf16_official"]["sequence_bytes_at_context"] == 567_168 + 512 * 50_694
    assert model["activated_params"]["source"] == "config"


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["costs"]) == 0
    out = capsys.readouterr().out
    for figure in ("26.7%", "9.96%", "10.3%", "7.22%", "1.99%", "1.97%", "48,068", "4,969.50", "3,471"):
        assert figure in out, figure
    assert "Assumptions" in out


def test_plain_tables() -> None:
    configs = {"v4-flash": load_config("v4-flash")}
    mc = [costs.model_costs(name, cfg, 2**20) for name, cfg in configs.items()]
    text = costs.render_plain([costs.kv_table(mc, 2**20, ("gqa8",)), costs.storage_table(mc, 2**20)], ("note",))
    assert "GQA-8 x43" in text and "V3.2" not in text and "bf16_official" in text and "  - note" in text


def test_cli_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fig.png"
    assert main(["costs", "--json", "--plot", str(out)]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays pure JSON
    assert str(out) in captured.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000


def test_cli_bad_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["costs", "--model", str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_weight_bytes_are_what_a_checkpoint_holds(tiny_checkpoint: Path) -> None:
    """``dsv4 info``'s weight figures, against the tensors a written checkpoint really holds (safetensors
    headers), and the bytes a decoded token reads against a recount by hand."""
    from dsv4.checkpoint import checkpoint_tensors
    from dsv4.costs import weight_bytes

    config = ModelConfig.from_file(tiny_checkpoint)
    itemsize = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F32": 4, "I64": 8}
    held = {
        name: math.prod(shape) * itemsize[dtype] for name, (shape, dtype) in checkpoint_tensors(tiny_checkpoint).items()
    }
    weights = weight_bytes(config)
    assert weights.total == sum(held.values())
    assert weights.mtp == sum(n for name, n in held.items() if name.startswith("mtp."))
    fp4 = sum(n for name, n in held.items() if ".experts." in name)
    assert weights.by_kind["fp4"] == fp4  # the tiny config's routed experts are FP4, like V4's
    main = {name: n for name, n in held.items() if not name.startswith("mtp.")}
    routed = sum(n for name, n in main.items() if ".experts." in name)
    one_row = main["embed.weight"] // config.vocab_size
    hash_rows = sum(n // config.vocab_size for name, n in main.items() if name.endswith("tid2eid"))
    hash_tables = sum(n for name, n in main.items() if name.endswith("tid2eid"))
    expected = sum(main.values()) - routed - main["embed.weight"] - hash_tables + one_row + hash_rows
    expected += routed * config.n_activated_experts // config.n_routed_experts
    assert weights.activated_per_token == expected


def test_info_prints_weight_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from dsv4.commands.info import run

    assert run(argparse.Namespace(model="v4-flash", tp=4)) == 0
    out = capsys.readouterr().out
    assert "weights: 159.61 GB (FP4 150.59, FP8 6.02" in out  # the 160 GB the V4-Flash repository holds
    assert "read per decoded token: 11.22 GB" in out
    assert "per rank with --tp 4: 41.61, 41.61, 41.61, 41.61 GB" in out  # fits an H200's 141 GB with room for cache


def test_rank_weight_bytes_are_what_each_rank_builds(tiny_checkpoint: Path) -> None:
    """``dsv4 info --tp N``'s per-rank figures, against the tensors each rank's model allocates (built on the
    meta device: shapes only), and the split adding up to the whole checkpoint plus the replicas."""
    from dsv4.costs import rank_weight_bytes, weight_bytes
    from dsv4.model.parallel import ParallelContext
    from dsv4.model.transformer import Transformer

    config = ModelConfig.from_file(tiny_checkpoint)
    per_rank = rank_weight_bytes(config, 2)
    for rank, expected in enumerate(per_rank):
        with torch.device("meta"):
            model = Transformer(config, "bf16_official", ParallelContext(2, rank))
        assert sum(t.nbytes for t in model.state_dict().values()) == expected
    total = weight_bytes(config).total
    assert total < sum(per_rank) < 2 * total  # the replicated tensors are held twice, the split ones once
