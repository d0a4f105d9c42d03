"""Where the model, its cache and its sampler live: one device per engine, named by the user."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` checked against this machine; a clear error for one it lacks."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no CUDA device (torch {torch.__version__})")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise ValueError(f"device {device!r}: dsv4 runs on cpu or cuda")
    return resolved


def device_scope(device: torch.device) -> contextlib.AbstractContextManager:
    """Where tensors made without ``device=`` (positions, index lists, masks, cache rows) go: onto ``device``.

    On CPU, where they go anyway, nothing is pushed: a device mode intercepts every torch call in Python,
    which a decode step of many small ops would pay for."""
    return contextlib.nullcontext() if device.type == "cpu" else torch.device(device)
