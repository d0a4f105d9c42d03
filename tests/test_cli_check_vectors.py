"""``dsv4 check-vectors`` as a user runs it: exit 0 on the shared set, non-zero on a set it must reject."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from dsv4.cli import main


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
