"""Build a model from a checkpoint directory: config, numerics, weights."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from dsv4.checkpoint import load_checkpoint
from dsv4.config import ModelConfig
from dsv4.device import device_scope, resolve_device
from dsv4.model.parallel import SINGLE, ParallelContext, tensor_shard
from dsv4.model.transformer import Transformer
from dsv4.numerics.modes import DEFAULT_MODE, Numerics, get_numerics


def default_numerics(config: ModelConfig) -> str:
    """Quantised (official) checkpoints run with the official simulation; plain bf16 ones without it."""
    return DEFAULT_MODE if config.weight_dtype == "fp8" else "fp32_nosim"


def load_model(
    path: str | Path,
    numerics: str | Numerics | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    parallel: ParallelContext = SINGLE,
) -> Transformer:
    """The model of the checkpoint at ``path``, or with ``parallel`` of several ranks this rank's share of it:
    its slices of the split tensors and its routed experts, read from the memory-mapped shards and nothing
    else (``dsv4.model.parallel.tensor_shard``). Every rank calls it; its forward is then a collective."""
    config = ModelConfig.from_file(path)
    with device_scope(resolve_device(device)):  # allocated where they will live, then filled
        model = Transformer(config, get_numerics(numerics or default_numerics(config)), parallel)
    owned = None if parallel.world_size == 1 else functools.partial(tensor_shard, config=config, parallel=parallel)
    load_checkpoint(model.state_dict(), path, progress=progress, owned=owned)
    return model
