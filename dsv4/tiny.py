"""Tiny random DeepSeek-V4 models in the exact official checkpoint format, for tests and benchmarks.

The default config mirrors the official-reference test model (``tests/data/reference/ckpt``): every layer
kind, hash and score routing, mHC, YaRN with a short original context and an MTP block, at a size that
runs in milliseconds on a CPU. The weights are random but "healthy" - scaled like the reference model's,
whose logits have a std of about 2.5, whose attention is neither uniform nor saturated and whose SwiGLU
clamp is active on a few percent of values - and every parameter that a wrong implementation could
ignore (sinks, ``ape``, mHC base/scale, router bias, ``tid2eid``) is randomised, so that parity tests
against other implementations can tell a missing term from a correct one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dsv4.chat.tokenizer import build_test_tokenizer
from dsv4.checkpoint import expected_tensors, save_checkpoint
from dsv4.config import FP4_BLOCK, QUANT_BLOCK, ModelConfig
from dsv4.numerics.formats import quant_fp4_weight, quant_fp8_weight

log = logging.getLogger("dsv4")

# The model name that means "the tiny random checkpoint in the cache" wherever a model is asked for.
TINY_RANDOM = "tiny-random"
# tiny-random's context: an agent trace (a tool-using system prompt is ~1,000 tokens, each turn a few
# hundred) must fit dozens of turns. Part of the cache directory's name, so a model written with another
# context is never picked up.
TINY_RANDOM_CONTEXT = 65536

# Layer kinds window / CSA / HCA / window / CSA, repeated when more layers are asked for.
_RATIO_CYCLE = (0, 4, 128, 0, 4)

_TINY: dict[str, Any] = {
    "vocab_size": 1280,
    "dim": 256,
    "moe_inter_dim": 128,
    "n_layers": 5,
    "n_hash_layers": 2,
    "n_mtp_layers": 1,
    "n_heads": 8,
    "n_routed_experts": 8,
    "n_activated_experts": 2,
    "route_scale": 1.5,
    "swiglu_limit": 10.0,
    "q_lora_rank": 128,
    "head_dim": 256,
    "rope_head_dim": 64,
    "o_groups": 2,
    "o_lora_rank": 128,
    "window_size": 128,
    "original_seq_len": 256,  # small, so that YaRN changes the frequencies at test lengths
    "rope_factor": 16.0,
    "index_n_heads": 16,
    "index_head_dim": 128,
    "index_topk": 32,
    "hc_mult": 4,
    "max_position_embeddings": 4096,
}

# Linear weights are N(0, gain^2 / fan_in); these gains are the reference model's, which keep the residual
# stream, the routing and the SwiGLU clamp in a realistic regime (attention output and experts would
# otherwise be drowned by the residual, and the clamp never hit).
_GAINS: tuple[tuple[re.Pattern[str], float], ...] = tuple(
    (re.compile(p + r"\.weight$"), g)
    for p, g in (
        (r"attn\.wo_b", 5.0),
        (r"shared_experts\.w1", 4.0),
        (r"shared_experts\.w3", 3.0),
        (r"shared_experts\.w2", 0.16),
        (r"experts\.\d+\.w[13]", 3.5),
        (r"experts\.\d+\.w2", 0.17),
        (r"ffn\.gate", 2.0),
        (r"compressor\.wgate", 1.5),
        (r"indexer\.wq_b", 1.2),
        (r"head", 2.5),
    )
)
# RMSNorm weights are mean * (1 + 0.1 N(0,1)); the KV norms sit higher so attention logits are not flat.
_NORM_MEANS = {"attn.kv_norm.weight": 1.5, "attn.compressor.norm.weight": 1.5}


def tiny_config(**overrides: Any) -> ModelConfig:
    """A small healthy config like the reference model's; any :class:`ModelConfig` field can be overridden.

    Changing ``n_layers`` or ``n_mtp_layers`` without ``compress_ratios`` repeats the window/CSA/HCA/window/
    CSA cycle (MTP blocks are window-only, as in the real models), and ``n_hash_layers`` defaults to at most
    2 so that fewer layers still validate.
    """
    fields = {**_TINY, **overrides}
    if "compress_ratios" not in overrides:
        n, mtp = fields["n_layers"], fields["n_mtp_layers"]
        fields["compress_ratios"] = tuple(_RATIO_CYCLE[i % len(_RATIO_CYCLE)] for i in range(n)) + (0,) * mtp
    if "n_hash_layers" not in overrides:
        fields["n_hash_layers"] = min(fields["n_hash_layers"], fields["n_layers"])
    return ModelConfig(**fields)


def _gain(name: str) -> float:
    return next((g for pattern, g in _GAINS if pattern.search(name)), 1.0)


def _block_gains(rows: int, cols: int, block_rows: int, block_cols: int, g: torch.Generator) -> torch.Tensor:
    """Per-block factors 2^U(-0.5, 0.5), expanded over a [rows, cols] weight, so that the quantiser picks
    different e8m0 scales for different blocks (a loader or GEMM that mixes up blocks then shows)."""
    nr, nc = math.ceil(rows / block_rows), math.ceil(cols / block_cols)
    f = torch.exp2(torch.rand(nr, nc, generator=g) - 0.5)
    return f.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]


def _quantised_linear(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, scale) of an FP8 or int8-packed FP4 Linear, drawn in fp32 and quantised as stored."""
    rows, cols = shape[0], shape[1] * (2 if dtype == torch.int8 else 1)
    w = torch.randn(rows, cols, generator=g) * (_gain(name) / math.sqrt(cols))
    if dtype == torch.int8:
        return quant_fp4_weight(w * _block_gains(rows, cols, 1, FP4_BLOCK, g))
    return quant_fp8_weight(w * _block_gains(rows, cols, QUANT_BLOCK, QUANT_BLOCK, g))


def _plain(name: str, shape: tuple[int, ...], config: ModelConfig, g: torch.Generator) -> torch.Tensor:
    """A tensor stored as is (bf16 / fp32 / int64), drawn for its role."""

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=g)

    if name == "embed.weight":
        return randn()
    if name.endswith("norm.weight"):
        role = re.sub(r"^(layers|mtp)\.\d+\.", "", name)
        return _NORM_MEANS.get(role, 1.0) * (1 + 0.1 * randn())
    if name.endswith("attn_sink"):
        return 1.5 + 2 * randn()  # some heads mostly attend to the sink, others barely
    if name.endswith(".ape"):
        return 0.5 * randn()
    if name.endswith("_fn"):  # mHC projections: mixes of order 1 after the RMS normalisation
        return randn() / math.sqrt(shape[1])
    if name.endswith("_base"):
        return 0.5 * randn()
    if name.endswith("_scale"):
        return 1 + 0.15 * randn()
    if name.endswith("gate.bias"):
        return 0.25 * randn()
    if name.endswith("gate.tid2eid"):  # distinct experts per token: the first k of a random permutation
        perm = torch.rand(config.vocab_size, config.n_routed_experts, generator=g).argsort(dim=1)
        return perm[:, : shape[1]].contiguous()
    if name.endswith(".weight") and len(shape) == 2:
        return randn() * (_gain(name) / math.sqrt(shape[1]))
    raise ValueError(f"random_state has no recipe for checkpoint tensor {name!r}")


def random_state(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of :func:`expected_tensors` (same names, shapes, dtypes), random and healthy.

    Deterministic for a given config and seed. Quantised weights are drawn in fp32 and quantised to their
    stored format with varying per-block scales.
    """
    g = torch.Generator().manual_seed(seed)
    specs = expected_tensors(config)
    out: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in specs.items():
        if name in out:
            continue
        scale = name.removesuffix("weight") + "scale"
        if name.endswith(".weight") and scale in specs:
            out[name], out[scale] = _quantised_linear(name, shape, dtype, g)
        else:
            out[name] = _plain(name, shape, config, g).to(dtype)
    return {k: out[k] for k in specs}


def write_random_checkpoint(
    path: str | Path, config: ModelConfig | None = None, seed: int = 0, shards: int = 2, tokenizer: bool = True
) -> Path:
    """Write a random model as a complete official-format model directory and return its path.

    config.json, generation_config.json, ``shards`` safetensors shards and their index, and - unless
    ``tokenizer`` is false - a byte-level test tokenizer of exactly ``vocab_size`` ids holding every V4
    special token (tokenizer.json, tokenizer_config.json), so that the directory can be served end to end.
    That tokenizer needs a vocabulary of at least the V4 special tokens plus the 256 byte symbols.
    """
    config = config or tiny_config()
    path = Path(path)
    save_checkpoint(random_state(config, seed), config, path, n_shards=shards)
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer:
        build_test_tokenizer(config.vocab_size).save(path)
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv4"


def tiny_random_checkpoint() -> Path:
    """The ``tiny-random`` model: a random tiny checkpoint with a test tokenizer, written once into the cache.

    It is written to a temporary directory and renamed into place, so a process killed mid-write, or two
    starting at once, never leave a half-written model behind.
    """
    target = cache_dir() / f"{TINY_RANDOM}-{TINY_RANDOM_CONTEXT}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("writing the %s model to %s (once)", TINY_RANDOM, target)
        scratch = Path(tempfile.mkdtemp(prefix=f".{TINY_RANDOM}-", dir=target.parent))
        try:
            write_random_checkpoint(scratch / "model", tiny_config(max_position_embeddings=TINY_RANDOM_CONTEXT))
            os.replace(scratch / "model", target)
        except OSError:
            if not target.is_dir():  # not just another server winning the race
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target
