"""Config reading and validation: real V4 configs load, bad ones fail naming the field and the value."""

from __future__ import annotations

import json

import pytest

from dsv4.config import ConfigError, LayerKind, ModelConfig, load_config

FLASH_KINDS = ["window", "window"] + ["csa", "hca"] * 20 + ["csa"]


def test_presets_have_the_published_schedules():
    flash, pro = ModelConfig.preset("v4-flash"), ModelConfig.preset("v4-pro")
    assert [s.kind.value for s in flash.layers] == FLASH_KINDS
    assert [s.kind for s in pro.layers[:3]] == [LayerKind.HCA, LayerKind.HCA, LayerKind.CSA]
    assert sum(s.kind == LayerKind.CSA for s in pro.layers) == 30
    assert sum(s.kind == LayerKind.HCA for s in pro.layers) == 31
    for config in (flash, pro):
        assert [s.hash_routed for s in config.layers[:4]] == [True, True, True, False]
        (mtp,) = config.mtp_layers
        assert mtp.kind == LayerKind.WINDOW and not mtp.hash_routed and not mtp.yarn
        assert all(s.yarn == (s.compress_ratio > 0) for s in config.layers)
        assert all(s.rope_theta == (160000 if s.compress_ratio else 10000) for s in config.layers)
    assert flash.expert_dtype == "fp4" and flash.weight_dtype == "fp8"  # initial Flash root config lacks it


def test_hf_round_trip(tmp_path):
    flash = ModelConfig.preset("v4-flash")
    (tmp_path / "config.json").write_text(json.dumps(flash.replace().to_hf()))
    assert load_config(tmp_path) == flash


def _hf(**changes) -> dict:
    """The real V4-Flash config.json with some fields changed."""
    return {**ModelConfig.preset("v4-flash").to_hf(), **changes}


@pytest.mark.parametrize(
    "changes,field,value",
    [
        ({"compress_ratios": [0, 0, 8] + [4] * 41}, "compress_ratios[2]", "8"),
        ({"compress_ratios": [0, 4, 128]}, "compress_ratios", "[0, 4, 128]"),
        ({"hidden_size": 4000}, "hidden_size", "4000"),
        ({"q_lora_rank": 1000}, "q_lora_rank", "1000"),
        ({"moe_intermediate_size": 2050}, "moe_intermediate_size", "2050"),
        ({"head_dim": 500}, "head_dim", "500"),
        ({"index_head_dim": 96}, "index_head_dim", "96"),
        ({"o_groups": 7}, "o_groups", "7"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok", "300"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "weight_block_size", "64"),
    ],
)
def test_bad_configs_name_the_field_and_value(changes, field, value):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_hf(_hf(**changes))
    assert field in str(err.value) and value in str(err.value)


def test_missing_field_and_bad_files(tmp_path):
    cfg = _hf()
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf(cfg)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("v5-ultra")
