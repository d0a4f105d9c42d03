"""The device argument on a machine without CUDA: plain errors for devices it lacks, and the CPU path
unchanged (no device mode pushed). ``benchmarks/device_check.py`` runs the CUDA path where there is one."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dsv4.cli import main
from dsv4.device import device_scope, resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def test_cpu_is_the_default_and_pushes_no_device_mode() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert isinstance(device_scope(torch.device("cpu")), contextlib.nullcontext)
    with device_scope(torch.device("meta")):
        assert torch.arange(3).device.type == "meta"  # what a CUDA scope does for the step's index tensors


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "mps"])
def test_unknown_devices_are_refused(device: str) -> None:
    with pytest.raises(ValueError, match="device"):
        resolve_device(device)


@no_cuda
def test_cuda_without_a_device_is_a_clear_cli_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", "tiny-random", "--prompt", "x", "--device", "cuda"]) == 2
    assert "this machine has no CUDA device" in capsys.readouterr().err


@no_cuda
def test_device_check_says_plainly_that_there_is_no_device(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    assert "No CUDA device on this machine" in capsys.readouterr().out


def test_an_engine_on_an_explicit_cpu_device_generates() -> None:
    from dsv4.engine.llm import LLM
    from dsv4.engine.sampling import SamplingParams

    llm = LLM("tiny-random", device="cpu", progress=False, max_num_seqs=2)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3 and llm.pool.device == torch.device("cpu")
