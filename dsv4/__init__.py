"""dsv4: an inference engine for DeepSeek-V4-style models, built for long-running agents."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]

if TYPE_CHECKING:
    from dsv4.engine.llm import LLM
    from dsv4.engine.sampling import SamplingParams

# Lazy, so that `import dsv4` (the CLI, config tools) does not pay for torch and the model code.
_LAZY = {"LLM": "dsv4.engine.llm", "SamplingParams": "dsv4.engine.sampling"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")
