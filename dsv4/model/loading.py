"""Build a model from a checkpoint directory: config, numerics, weights."""

from __future__ import annotations

from pathlib import Path

import torch

from dsv4.checkpoint import load_checkpoint
from dsv4.config import ModelConfig
from dsv4.device import device_scope, resolve_device
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
) -> Transformer:
    config = ModelConfig.from_file(path)
    with device_scope(resolve_device(device)):  # allocated where they will live, then filled
        model = Transformer(config, get_numerics(numerics or default_numerics(config)))
    load_checkpoint(model.state_dict(), path, progress=progress)
    return model
