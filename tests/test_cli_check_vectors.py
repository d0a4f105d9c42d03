"""``dsv4 check-vectors`` as a user runs it: exit 0 on the shared set, non-zero on a set it must reject."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4.cli import main
from dsv4.commands.check_vectors import compare, judge


def test_passes_on_the_reference_set(reference_dir, capsys):
    assert main(["check-vectors", str(reference_dir), "--mode", "fp32_nosim"]) == 0
    out = capsys.readouterr().out
    assert "fp32_nosim (model): within atol" in out and "sparse_attn.o" in out and "all checks passed" in out


def test_fails_when_the_reference_disagrees(reference_dir, tmp_path, capsys):
    """A logit moved by 0.01 in one decode row must fail fp32_nosim (atol 5e-4) and make the exit non-zero."""
    broken = tmp_path / "set"
    shutil.copytree(reference_dir, broken)
    vectors = load_file(broken / "vectors.safetensors")
    vectors["prompt1.fp32_nosim.logits"][7, 3] += 0.01
    save_file(vectors, broken / "vectors.safetensors")
    assert main(["check-vectors", str(broken), "--mode", "fp32_nosim", "--no-kernels"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: prompt 1: rows [7] exceed atol" in out and "FAILED" in out


def test_bad_arguments_are_clear_errors(reference_dir, tmp_path, capsys):
    assert main(["check-vectors", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["check-vectors", str(reference_dir), "--mode", "fp64"]) == 2
    assert "not in this vector set" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check-vectors"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "rule",
    [
        {"atol": 5e-4},
        {"exact_tier_atol": 0.0, "statistical_mean_abs": 0.5, "statistical_min_argmax_agree": 0.6},
    ],
    ids=["atol", "statistical"],
)
def test_non_finite_logits_fail_every_tier(bad, rule):
    """A NaN compares false with every bound, so each check is written to fail it; inf fails as a NaN row."""
    ref = torch.randn(5, 32)
    mine = ref.clone()
    mine[3, 7] = bad
    result = judge("m", [compare(0, mine, ref)], {"m": rule})
    assert not result.passed and result.tier == "FAIL"
    assert any("NaN or inf logits on rows [3]" in problem for problem in result.problems)
    clean = judge("m", [compare(0, ref.clone(), ref)], {"m": rule})
    assert clean.passed and not clean.problems
    # a NaN in the reference poisons the differences: never within a bound either
    poisoned = ref.clone()
    poisoned[0, 0] = float("nan")
    assert not judge("m", [compare(0, ref.clone(), poisoned)], {"m": rule}).passed


def test_nan_in_the_reference_fails_the_cli(reference_dir, tmp_path, capsys):
    broken = tmp_path / "set"
    shutil.copytree(reference_dir, broken)
    vectors = load_file(broken / "vectors.safetensors")
    vectors["prompt0.fp32_nosim.logits"][2, 5] = float("nan")
    save_file(vectors, broken / "vectors.safetensors")
    assert main(["check-vectors", str(broken), "--mode", "fp32_nosim", "--no-kernels"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: prompt 0: rows [2] exceed atol" in out and "FAILED" in out


@pytest.mark.parametrize("how", [["--chunk", "64"], ["--batch"], ["--reuse"]])
def test_engine_paths_refuse_a_set_longer_than_the_context(reference_dir, tmp_path, capsys, how):
    """Prompts of 343 and 621 tokens plus their decode tokens do not fit a 600-position checkpoint: one line,
    exit 2, before any model is loaded."""
    short = tmp_path / "set"
    shutil.copytree(reference_dir, short)
    config_path = short / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = 600
    config_path.write_text(json.dumps(config))
    assert main(["check-vectors", str(short), "--mode", "fp32_nosim", "--no-kernels", *how]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert "prompt 1 needs" in line and "max_position_embeddings is 600" in line and "--chunk" in line
