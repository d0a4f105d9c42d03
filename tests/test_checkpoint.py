"""Official-format checkpoint I/O (dsv4.checkpoint) and the tiny random models (dsv4.tiny)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4.chat.tokenizer import load_tokenizer
from dsv4.checkpoint import (
    INDEX_NAME,
    CheckpointError,
    allocate_state,
    checkpoint_tensors,
    dtype_name,
    expected_tensors,
    load_checkpoint,
    open_checkpoint_config,
    save_checkpoint,
)
from dsv4.config import ModelConfig
from dsv4.model.parallel import WHOLE, Shard
from dsv4.tiny import random_state, tiny_config, write_random_checkpoint

REF = Path(__file__).parent / "data" / "reference" / "ckpt"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A view that torch.equal compares bit for bit (fp8/e8m0 have no equality kernels; NaN != NaN)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def _ref_contents() -> dict[str, tuple[tuple[int, ...], str]]:
    """The reference checkpoint's tensors, read with safe_open directly (independent of checkpoint.py)."""
    weight_map = json.loads((REF / INDEX_NAME).read_text())["weight_map"]
    out = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(REF / file, framework="pt") as f:
            for k in f.keys():  # noqa: SIM118
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    assert set(out) == set(weight_map)
    return out


@pytest.fixture(scope="module")
def ref_config() -> ModelConfig:
    return ModelConfig.from_file(REF)


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """random_state(tiny_config(), seed=0), drawn once; tests must not modify it in place."""
    return random_state(tiny_config(), seed=0)


def _copy_ref(dst: Path) -> Path:
    """A writable copy of the reference checkpoint that a test may damage."""
    shutil.copytree(REF, dst)
    dst.chmod(0o755)  # the stored reference is read-only, and copytree copies modes
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


# ---------------------------------------------------------------------------------------------- layout
def test_expected_tensors_match_reference_exactly(ref_config: ModelConfig) -> None:
    want = {k: (shape, dtype_name(dtype)) for k, (shape, dtype) in expected_tensors(ref_config).items()}
    have = _ref_contents()
    assert sorted(set(want) - set(have)) == [] and sorted(set(have) - set(want)) == []
    assert {k: want[k] for k in sorted(want)} == {k: have[k] for k in sorted(have)}
    assert checkpoint_tensors(REF) == want


def test_tiny_config_is_the_reference_config(ref_config: ModelConfig) -> None:
    assert tiny_config() == ref_config


def test_flash_preset_layout() -> None:
    c = ModelConfig.preset("v4-flash")
    e = expected_tensors(c)
    # The real Flash index: total_size 159,609,485,896 bytes (spec §9.4).
    assert sum(math.prod(shape) * dtype.itemsize for shape, dtype in e.values()) == 159_609_485_896
    assert e["layers.0.ffn.gate.tid2eid"] == ((129280, 6), torch.int64)
    assert "layers.0.ffn.gate.bias" not in e and "layers.0.ffn.gate.weight" in e
    assert "layers.2.ffn.gate.tid2eid" in e and "layers.3.ffn.gate.tid2eid" not in e
    assert e["layers.3.ffn.gate.bias"] == ((256,), torch.float32)
    assert e["layers.2.attn.indexer.wq_b.weight"] == ((8192, 1024), torch.float8_e4m3fn)
    assert e["layers.2.attn.indexer.wq_b.scale"] == ((64, 8), torch.float8_e8m0fnu)
    assert e["layers.2.attn.compressor.ape"] == ((4, 1024), torch.float32)
    assert e["layers.3.attn.compressor.wkv.weight"] == ((512, 4096), torch.bfloat16)
    assert e["layers.3.attn.compressor.ape"] == ((128, 512), torch.float32)
    assert e["layers.2.attn.indexer.compressor.ape"] == ((4, 256), torch.float32)
    assert e["layers.0.attn.wo_a.weight"] == ((8192, 4096), torch.float8_e4m3fn)
    assert e["layers.0.attn.wo_b.weight"] == ((4096, 8192), torch.float8_e4m3fn)
    assert e["layers.0.attn.wq_b.weight"] == ((32768, 1024), torch.float8_e4m3fn)
    assert e["layers.0.hc_attn_fn"] == ((24, 16384), torch.float32)
    assert e["layers.5.ffn.experts.255.w1.weight"] == ((2048, 2048), torch.int8)
    assert e["layers.5.ffn.experts.255.w1.scale"] == ((2048, 128), torch.float8_e8m0fnu)
    assert e["layers.5.ffn.experts.0.w2.weight"] == ((4096, 1024), torch.int8)
    assert e["mtp.0.e_proj.weight"] == ((4096, 4096), torch.float8_e4m3fn)
    assert e["mtp.0.ffn.gate.bias"] == ((256,), torch.float32)
    assert not any(k.startswith("mtp.") and ("emb" in k or k.endswith("head.weight")) for k in e)
    assert "mtp.0.attn.compressor.ape" not in e and "layers.0.attn.compressor.ape" not in e
    assert sum(k.endswith("attn.compressor.ape") for k in e) == 41
    assert sum(k.endswith("indexer.wq_b.weight") for k in e) == 21
    assert sum(k.endswith(".gate.tid2eid") for k in e) == 3
    assert sum(".experts." in k for k in e) == 44 * 256 * 6
    assert not any(k.startswith("layers.43.") for k in e)


def test_pro_preset_layout() -> None:
    e = expected_tensors(ModelConfig.preset("v4-pro"))
    assert e["layers.0.attn.compressor.ape"] == ((128, 512), torch.float32)  # Pro layers 0-1 are HCA
    assert e["layers.0.attn.wo_a.weight"] == ((16384, 4096), torch.float8_e4m3fn)
    assert e["layers.60.ffn.experts.383.w2.weight"] == ((7168, 1536), torch.int8)
    assert sum(k.endswith("indexer.wq_b.weight") for k in e) == 30


def test_expected_tensors_follow_weight_and_expert_dtypes() -> None:
    e = expected_tensors(tiny_config(weight_dtype="bf16", expert_dtype="fp8"))
    assert e["layers.0.attn.wq_a.weight"] == ((128, 256), torch.bfloat16)
    assert "layers.0.attn.wq_a.scale" not in e and "mtp.0.e_proj.scale" not in e
    assert e["layers.0.ffn.experts.3.w2.weight"] == ((256, 128), torch.float8_e4m3fn)
    assert e["layers.0.ffn.experts.3.w2.scale"] == ((2, 1), torch.float8_e8m0fnu)
    e = expected_tensors(tiny_config(expert_dtype="bf16"))
    assert e["layers.0.ffn.experts.3.w1.weight"] == ((128, 256), torch.bfloat16)
    assert "layers.0.ffn.experts.3.w1.scale" not in e
    assert e["layers.0.ffn.shared_experts.w1.weight"] == ((128, 256), torch.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------- loading
def test_load_reference_matches_safe_open(ref_config: ModelConfig) -> None:
    state = allocate_state(ref_config)
    load_checkpoint(state, REF, progress=False)
    weight_map = json.loads((REF / INDEX_NAME).read_text())["weight_map"]
    direct = {}
    for k, file in weight_map.items():
        with safe_open(REF / file, framework="pt") as f:
            direct[k] = f.get_tensor(k)
    _assert_same(state, direct)
    assert open_checkpoint_config(REF) == ref_config


def test_load_only_owned_experts(ref_config: ModelConfig) -> None:
    def owned(name: str) -> Shard | None:
        return WHOLE if ".experts." not in name or int(name.split(".experts.")[1].split(".")[0]) < 4 else None

    state = allocate_state(ref_config, [k for k in expected_tensors(ref_config) if owned(k) is not None])
    assert "layers.0.ffn.experts.7.w1.weight" not in state
    load_checkpoint(state, REF, progress=False, owned=owned)
    with safe_open(REF / "model-00002-of-00002.safetensors", framework="pt") as f:
        assert torch.equal(
            _bits(state["layers.3.ffn.experts.3.w2.weight"]),
            _bits(f.get_tensor("layers.3.ffn.experts.3.w2.weight")),
        )
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):  # the filter applies to both sides
        load_checkpoint({**state, "layers.0.extra": torch.zeros(1)}, REF, progress=False, owned=owned)


def _error(state: dict[str, torch.Tensor], path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(state, path, progress=False)
    return str(info.value)


def test_strict_errors_name_the_tensors(ref_config: ModelConfig, tmp_path: Path) -> None:
    state = allocate_state(ref_config)
    unexpected = dict(state)
    del unexpected["layers.2.ffn.gate.bias"]
    msg = _error(unexpected, REF)
    assert "1 unexpected in the checkpoint: layers.2.ffn.gate.bias" in msg

    shape = {**state, "layers.1.attn.attn_sink": torch.empty(9)}
    assert "layers.1.attn.attn_sink (checkpoint [8], model [9])" in _error(shape, REF)

    dtype = {**state, "layers.1.attn.wq_a.scale": torch.empty(1, 2, dtype=torch.float32)}
    assert "layers.1.attn.wq_a.scale (checkpoint F8_E8M0, model float32)" in _error(dtype, REF)

    # A checkpoint that lacks a tensor: drop it from the index of a copy.
    missing_dir = _copy_ref(tmp_path / "missing")
    index = json.loads((missing_dir / INDEX_NAME).read_text())
    del index["weight_map"]["mtp.0.hc_head_scale"]
    (missing_dir / INDEX_NAME).write_text(json.dumps(index))
    assert "1 missing from the checkpoint: mtp.0.hc_head_scale" in _error(state, missing_dir)

    # Everything wrong at once is reported in one error, long lists truncated.
    several = {k: v for k, v in shape.items() if not k.startswith("layers.4.")}
    msg = _error(several, missing_dir)
    assert "mtp.0.hc_head_scale" in msg and "layers.1.attn.attn_sink" in msg
    assert f"{sum(k.startswith('layers.4.') for k in state)} unexpected" in msg and "more" in msg
    assert len(msg) < 4000


def test_missing_shard_and_bad_index(ref_config: ModelConfig, tmp_path: Path) -> None:
    state = allocate_state(ref_config)
    d = _copy_ref(tmp_path / "noshard")
    (d / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors" in _error(state, d) and "do not exist" in _error(state, d)

    d = _copy_ref(tmp_path / "wrongfile")
    index = json.loads((d / INDEX_NAME).read_text())
    index["weight_map"]["norm.weight"] = "model-00001-of-00002.safetensors"
    (d / INDEX_NAME).write_text(json.dumps(index))
    assert "norm.weight" in _error(state, d)

    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(state, tmp_path / "nowhere", progress=False)


# ---------------------------------------------------------------------------------------------- saving
def test_save_load_round_trip_bitwise(tmp_path: Path) -> None:
    config = tiny_config()
    state = random_state(config, seed=3)
    save_checkpoint(state, config, tmp_path, max_shard_bytes=1 << 20)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    split = [
        k
        for k in index["weight_map"]
        if k.endswith(".scale") and index["weight_map"][k] != index["weight_map"].get(k[:-5] + "weight")
    ]
    assert split, "expected at least one weight and its scale in different shards"
    assert ModelConfig.from_file(tmp_path) == config

    loaded = allocate_state(config)
    load_checkpoint(loaded, tmp_path, progress=False)
    _assert_same(loaded, state)

    # Re-saving into the same directory with fewer shards leaves no stale shard behind.
    save_checkpoint(loaded, config, tmp_path, n_shards=2)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    again = allocate_state(config)
    load_checkpoint(again, tmp_path, progress=False)
    _assert_same(again, state)


def test_single_file_checkpoint(tmp_path: Path) -> None:
    config = tiny_config(n_layers=2, n_routed_experts=4)
    state = random_state(config)
    save_file(state, tmp_path / "model.safetensors")
    loaded = allocate_state(config)
    load_checkpoint(loaded, tmp_path, progress=False)
    _assert_same(loaded, state)


def test_save_refuses_a_state_that_does_not_match(tiny_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    state = dict(tiny_state)
    del state["layers.0.attn.wkv.scale"]
    with pytest.raises(CheckpointError, match="layers.0.attn.wkv.scale"):
        save_checkpoint(state, tiny_config(), tmp_path)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- tiny models
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"weight_dtype": "bf16", "expert_dtype": "bf16"},
        {"expert_dtype": "fp8"},
        {"n_layers": 7, "n_mtp_layers": 2},
    ],
)
def test_random_state_has_the_checkpoint_layout(overrides: dict) -> None:
    config = tiny_config(**overrides)
    state = random_state(config)
    assert {k: (tuple(t.shape), t.dtype) for k, t in state.items()} == expected_tensors(config)
    for k, t in state.items():
        assert torch.isfinite(t.float()).all(), k


def test_random_state_is_deterministic_and_varied(tiny_state: dict[str, torch.Tensor]) -> None:
    config = tiny_config()
    a, b, c = tiny_state, random_state(config, seed=0), random_state(config, seed=1)
    _assert_same(a, b)
    assert {k: (tuple(t.shape), t.dtype) for k, t in a.items()} == expected_tensors(config)
    for k, t in a.items():
        assert torch.isfinite(t.float()).all(), k
    assert not torch.equal(a["layers.0.attn.wq_a.weight"].float(), c["layers.0.attn.wq_a.weight"].float())
    tid2eid = a["layers.0.ffn.gate.tid2eid"]
    assert (tid2eid[:, 0] != tid2eid[:, 1]).all() and tid2eid.min() >= 0 and tid2eid.max() < 8
    assert len(torch.unique(tid2eid, dim=0)) > 20
    for name in (
        "layers.0.attn.attn_sink",
        "layers.2.attn.compressor.ape",
        "layers.1.hc_ffn_base",
        "layers.1.hc_ffn_scale",
        "hc_head_base",
        "layers.3.ffn.gate.bias",
        "layers.1.hc_attn_fn",
    ):
        t = a[name].float()
        assert t.std() > 0.01 and not torch.equal(t, torch.ones_like(t)), name
    # Quantised weights get several different block scales.
    assert len(torch.unique(a["layers.1.attn.wo_a.scale"].float())) > 1
    assert len(torch.unique(a["layers.1.ffn.experts.0.w1.scale"].float())) > 1


def test_write_random_checkpoint(tmp_path: Path) -> None:
    config = tiny_config(n_layers=3, compress_ratios=(4, 128, 0, 0))
    path = write_random_checkpoint(tmp_path / "m", config, seed=5, shards=3)
    assert len(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values())) == 3
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == config.eos_token_id
    assert open_checkpoint_config(path) == config
    loaded = allocate_state(config)
    load_checkpoint(loaded, path, progress=False)
    _assert_same(loaded, random_state(config, seed=5))
    tokenizer = load_tokenizer(path)
    assert tokenizer.vocab_size == config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    assert tokenizer.decode(tokenizer.encode("hello, world")) == "hello, world"


# ---------------------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("overrides", [{}, {"weight_dtype": "bf16", "expert_dtype": "fp8"}])
def test_model_state_dict_is_the_checkpoint_layout(overrides: dict) -> None:
    """The model's state_dict must hold exactly the checkpoint's tensors, so that loading is a plain copy."""
    transformer = pytest.importorskip("dsv4.model.transformer")
    config = tiny_config(**overrides)
    state = transformer.Transformer(config).state_dict()
    assert {k: (tuple(t.shape), t.dtype) for k, t in state.items()} == expected_tensors(config)
