"""Weights stay in the checkpoint's form: what the model holds after loading, and after forwards that route
to every expert, is the checkpoint's bytes (measured from the tensors reachable from the model, caches
included, not from a formula); and a decode step reads exactly the routed experts it chose."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dsv4.cache.contiguous import ContiguousCache
from dsv4.checkpoint import checkpoint_tensors
from dsv4.model.batch import Span
from dsv4.model.loading import load_model
from dsv4.model.moe import MoE
from dsv4.numerics import gemm
from dsv4.numerics.modes import MODES

ITEMSIZE = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F32": 4, "I64": 8}
# The bound: weights plus what the model may keep beside them (norm caches, RoPE tables...), while
# a dense fp32 copy of the FP8/FP4 weights would be 4-8x.
RESIDENT_BOUND = 1.1


def _tensors(obj: object, seen: set[int]) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``obj`` through module attributes, dicts, lists and tuples."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        for value in vars(obj).values():
            yield from _tensors(value, seen)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, seen)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value, seen)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages the model holds (a view and its base count once)."""
    storages = {}
    for t in _tensors(model, set()):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def checkpoint_bytes(path: Path) -> int:
    return sum(ITEMSIZE[dtype] * int(torch.Size(shape).numel()) for shape, dtype in checkpoint_tensors(path).values())


def _run(model: torch.nn.Module, prompt: list[int], decode: int) -> None:
    cache = ContiguousCache(model.n_cache_layers, model.config.window_size, model.numerics.dtype)
    model(torch.tensor(prompt), [Span(0, len(prompt), 0, cache)])
    for j in range(decode):
        model(torch.tensor([prompt[j % len(prompt)]]), [Span(0, 1, len(prompt) + j, cache)])


@pytest.mark.parametrize("mode", list(MODES))
def test_resident_weights_stay_the_checkpoints_bytes(tiny_checkpoint: Path, mode: str) -> None:
    model = load_model(tiny_checkpoint, mode, progress=False)
    held = checkpoint_bytes(tiny_checkpoint)
    assert resident_bytes(model) <= RESIDENT_BOUND * held
    routed: set[tuple[int, int]] = set()

    def record(module: MoE, _inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        routed.update((id(module), e) for e in output[1].flatten().tolist())

    moes = [m for m in model.layers.modules() if isinstance(m, MoE)]  # the main layers (not the MTP block)
    hooks = [m.gate.register_forward_hook(record) for m in moes]
    _run(model, list(range(3, 300)), decode=4)
    for h in hooks:
        h.remove()
    assert len(routed) == len(moes) * model.config.n_routed_experts  # every expert of every layer ran
    assert resident_bytes(model) <= RESIDENT_BOUND * held


def test_a_decode_step_reads_only_the_experts_it_chose(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(tiny_checkpoint, "bf16_official", progress=False)
    owner = {}
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        for e, expert in enumerate(moe.experts):
            for linear in (expert.w1, expert.w2, expert.w3):
                owner[linear.weight.data_ptr()] = (id(moe), e)
    read: list[tuple[int, int]] = []
    chosen: set[tuple[int, int]] = set()
    fp4_linear = gemm.fp4_linear

    def reading(x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, scale: torch.Tensor):
        read.append(owner[weight.data_ptr()])
        return fp4_linear(x, x_scale, weight, scale)

    def record(module: torch.nn.Module, _inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        chosen.update((id(moe_of[id(module)]), e) for e in output[1].flatten().tolist())

    moe_of = {id(m.gate): m for m in model.modules() if isinstance(m, MoE)}
    cache = ContiguousCache(model.n_cache_layers, model.config.window_size, model.numerics.dtype)
    prompt = list(range(5, 200))
    model(torch.tensor(prompt), [Span(0, len(prompt), 0, cache)])
    monkeypatch.setattr(gemm, "fp4_linear", reading)
    hooks = [m.gate.register_forward_hook(record) for m in moe_of.values()]
    model(torch.tensor([7]), [Span(0, 1, len(prompt), cache)])
    for h in hooks:
        h.remove()
    assert sorted(set(read)) == sorted(chosen)
    assert len(read) == 3 * len(chosen)  # w1, w3 and w2 of each chosen expert, each read once
