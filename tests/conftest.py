"""Shared fixtures: the in-repo reference vector set and tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Many small ops: with two OpenMP threads a busy machine stalls every op on thread barriers (measured 3-40x
# slower per decode step under load). The reference vectors are identical with one thread (manifest:
# noise variant "one_thread" = 0.0).
torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny model in the official format (with a test tokenizer), written once per session."""
    from dsv4.tiny import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=1)


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.manual_seed(0)
