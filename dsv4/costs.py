"""``dsv4 costs``: the KV-cache and decode-FLOPs arithmetic behind the V4 report's headline claims.

The report says that at 1M tokens V4-Pro needs 27% of DeepSeek-V3.2's single-token FLOPs and 10% of its KV
cache, V4-Flash 10% and 7%, and that the cache is about 2% of a BF16 GQA-8 model's. It does not print the
formula; architecture.md §13 reconstructs one that lands on all five numbers, and this module is that
reconstruction made executable, with each assumption written down (:data:`ASSUMPTIONS`) so the numbers can be
argued with. Cache bytes come from :mod:`dsv4.cache.layout`, the same functions the engine allocates from, so
the calculator also says what dsv4's own cache costs in each numerics mode.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dsv4.cache import layout
from dsv4.checkpoint import expected_tensors
from dsv4.config import LayerKind, ModelConfig, load_config
from dsv4.engine.llm import DEFAULT_CHUNK_SIZE

PRESET_MODELS = ("v4-flash", "v4-pro")
# Model card figures; the parameter FLOPs of the published ratios are 2 x these.
PUBLISHED_ACTIVATED_PARAMS = {"v4-flash": 13 * 10**9, "v4-pro": 49 * 10**9}
BASELINES = ("v3.2", "gqa8")
# The published "1M" ratios are reproduced at 10^6 tokens (Pro is 26.4% at 2^20, which would round to 26%).
DEFAULT_CONTEXT = 10**6
PLOT_MIN_CONTEXT = 2**10
PLOT_MAX_CONTEXT = 2**20
GIB = 2**30
# where the engine's default prompt chunks and cache blocks both end: its checkpoints sit on this grid
CHECKPOINT_GRID = math.lcm(DEFAULT_CHUNK_SIZE, layout.DEFAULT_BLOCK_TOKENS)

# "Equivalent FP8 FLOPs": how much one FLOP of each kind costs relative to an FP8 GEMM FLOP.
PARAM_WEIGHT = Fraction(1)  # FP8 and FP4xFP8 GEMMs
CORE_WEIGHT = Fraction(2)  # BF16 core attention
FP8_INDEXER_WEIGHT = Fraction(1)  # V3.2's lightning indexer
FP4_INDEXER_WEIGHT = Fraction(1, 2)  # V4's lightning indexer

GQA_KV_HEADS = 8
GQA_HEAD_DIM = 128
GQA_BYTES = 2  # bf16

ASSUMPTIONS = (
    "V4 KV (paper storage, §13.1): a compressed entry is 448 FP8 + 64 BF16 RoPE dims = 576 B (scale "
    "bytes not counted); an indexer key is 128 FP4 + 4 E8M0 scales = 68 B. CSA adds an entry and a key per "
    "4 tokens, HCA an entry per 128 tokens; the window ring and compressor state are O(1) and left out of "
    "per-token figures.",
    "V3.2 KV: FlashMLA's FP8 sparse layout, 512 FP8 + 4 fp32 scales + 64 BF16 = 656 B, plus a 132 B FP8 "
    "indexer key (128 FP8 + one fp32 scale) = 788 B per token per layer, 61 layers.",
    "GQA-8 KV: 8 KV heads x head_dim 128 x (K and V) x BF16 = 4,096 B per token per layer, same layer "
    "count as the model it is compared with.",
    "Decode FLOPs per token at L keys (multiply-add = 2): V4 core attention 2·H·(512+512) per attended key "
    "(window 128; + top-k for CSA; + L/128 for HCA); V4 indexer 2·64·128·L/4 + 2·64·L/4 per CSA layer; V3.2 "
    "core 2·128·(576+512) x top-2048 and indexer 2·64·128·L + 2·64·L per layer; parameters 2 x activated "
    "params (published: Flash 13B, Pro 49B, V3.2 37B; a model directory uses the count from its config).",
    "FP8-equivalent weighting: parameter GEMMs x1, BF16 core attention x2, V3.2's FP8 indexer x1, "
    "V4's FP4 indexer x1/2.",
    "Context: the published '1M' ratios are met at L = 10^6 (the default); --context reads K = 1024, "
    "M = 2^20, where Pro's FLOPs ratio is 26.4%.",
    "dsv4's cache (bf16_official, fp32_sim): FP8 codes + one E8M0 scale per 64 non-RoPE dims, RoPE dims in "
    "the activation dtype, FP4 indexer keys + one E8M0 scale per 32; fp32_nosim keeps every dim in fp32. "
    "The official code stores everything in bf16 (official_code), about twice the paper's figure.",
)


# ---------------------------------------------------------------------------------------------- parsing
_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
_CONTEXT_RE = re.compile(r"(\d+(?:\.\d*)?(?:[eE]\d+)?)([KMG]?)", re.IGNORECASE)


def parse_context(text: str) -> int:
    """A token count: ``131072``, ``128K``, ``1M`` (binary suffixes, as in "a 128K context"), ``1e6``."""
    match = _CONTEXT_RE.fullmatch(text.strip().replace("_", "").replace(",", ""))
    value = Fraction(match[1]) * _SUFFIXES[match[2].upper()] if match else None
    if value is None or value.denominator != 1 or value < 1:
        raise ValueError(
            f"--context {text!r}: expected a whole number of tokens >= 1 such as 131072, 128K, 1M or 1e6 "
            "(K = 1024, M = 1048576)"
        )
    return int(value)


# ---------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class Flops:
    """Decode FLOPs for one token, by part, raw; ``fp8_equivalent`` applies the precision weighting."""

    parameters: Fraction
    core_attention: Fraction
    indexer: Fraction
    indexer_weight: Fraction

    @property
    def raw(self) -> Fraction:
        return self.parameters + self.core_attention + self.indexer

    @property
    def fp8_equivalent(self) -> Fraction:
        return PARAM_WEIGHT * self.parameters + CORE_WEIGHT * self.core_attention + self.indexer_weight * self.indexer

    def as_dict(self) -> dict[str, float]:
        return {
            "parameters": float(self.parameters),
            "core_attention": float(self.core_attention),
            "indexer": float(self.indexer),
            "raw_total": float(self.raw),
            "fp8_equivalent": float(self.fp8_equivalent),
            "weights": {
                "parameters": float(PARAM_WEIGHT),
                "core_attention": float(CORE_WEIGHT),
                "indexer": float(self.indexer_weight),
            },
        }


# ---------------------------------------------------------------------------------------------- baselines
@dataclass(frozen=True)
class V32Baseline:
    """DeepSeek-V3.2 (MLA + DSA) from its config_671B_v3.2.json, attending in the absorbed 576-dim latent."""

    n_layers: int = 61
    n_heads: int = 128
    kv_lora_rank: int = 512
    rope_head_dim: int = 64
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    activated_params: int = 37 * 10**9

    @property
    def entry_bytes(self) -> int:
        """FlashMLA FP8 sparse layout: FP8 latent, one fp32 scale per 128 dims, BF16 RoPE dims."""
        return self.kv_lora_rank + 4 * (self.kv_lora_rank // 128) + 2 * self.rope_head_dim

    @property
    def indexer_key_bytes(self) -> int:
        return self.index_head_dim + 4

    def kv_bytes_per_token(self) -> dict[str, int]:
        return {
            "mla_entries": self.n_layers * self.entry_bytes,
            "indexer_keys": self.n_layers * self.indexer_key_bytes,
        }

    def flops(self, context: int) -> Flops:
        keys = min(self.index_topk, context)
        qk = self.kv_lora_rank + self.rope_head_dim  # scores over the whole latent incl. RoPE
        core = 2 * self.n_heads * (qk + self.kv_lora_rank) * keys
        indexer = (2 * self.index_n_heads * self.index_head_dim + 2 * self.index_n_heads) * context
        return Flops(
            parameters=Fraction(2 * self.activated_params),
            core_attention=Fraction(self.n_layers * core),
            indexer=Fraction(self.n_layers * indexer),
            indexer_weight=FP8_INDEXER_WEIGHT,
        )


V32 = V32Baseline()


def gqa8_kv_bytes_per_token(n_layers: int) -> int:
    return n_layers * GQA_KV_HEADS * GQA_HEAD_DIM * 2 * GQA_BYTES


# ---------------------------------------------------------------------------------------------- V4
def v4_flops(config: ModelConfig, context: int, activated_params: int) -> Flops:
    """Keys are counted continuously (L/r entries), as the report's curves are; short contexts cap the window
    and the top-k at what exists."""
    per_key = 2 * config.n_heads * 2 * config.head_dim  # QK and PV over the full head
    window = min(config.window_size, context)
    keys = Fraction(0)
    indexer = Fraction(0)
    for spec in config.layers:
        keys += window
        if spec.kind is LayerKind.CSA:
            entries = Fraction(context, spec.compress_ratio)
            keys += min(config.index_topk, entries)
            indexer += (2 * config.index_n_heads * config.index_head_dim + 2 * config.index_n_heads) * entries
        elif spec.kind is LayerKind.HCA:
            keys += Fraction(context, spec.compress_ratio)
    return Flops(
        parameters=Fraction(2 * activated_params),
        core_attention=per_key * keys,
        indexer=indexer,
        indexer_weight=FP4_INDEXER_WEIGHT,
    )


@dataclass(frozen=True)
class ParamCount:
    total: int  # main model, MTP block excluded
    activated: int  # per token: everything but the unrouted experts and the embedding table (a lookup)


def count_params(config: ModelConfig) -> ParamCount:
    """Parameters from the config's shapes; matches the model card's 284B/13B and 1.6T/49B (FP8/FP4 scale
    tensors not counted). The MTP block is excluded, as decoding without speculation never runs it."""
    d, heads, hd, qr = config.dim, config.n_heads, config.head_dim, config.q_lora_rank
    mix = (2 + config.hc_mult) * config.hc_mult
    expert = 3 * d * config.moe_inter_dim
    dense = 0
    routed = 0
    for spec in config.layers:
        dense += d * qr + qr + qr * heads * hd + d * hd + hd  # wq_a, q_norm, wq_b, wkv, kv_norm
        dense += config.o_groups * config.o_lora_rank * (heads * hd // config.o_groups)  # wo_a
        dense += d * config.o_groups * config.o_lora_rank + heads  # wo_b, attn_sink
        for frontier in layout.frontiers(config, spec):  # each compressor: wkv, wgate, ape, norm
            width = frontier.coff * frontier.width
            dense += 2 * width * d + frontier.ratio * width + frontier.width
        if spec.kind is LayerKind.CSA:
            dense += qr * config.index_n_heads * config.index_head_dim + config.index_n_heads * d
        dense += 2 * (mix * config.hc_mult * d + mix + 3) + 2 * d  # two mHC units, attn_norm, ffn_norm
        dense += config.n_routed_experts * d + (0 if spec.hash_routed else config.n_routed_experts)  # gate
        dense += config.n_shared_experts * expert
        routed += config.n_routed_experts * expert
    embedding = config.vocab_size * d
    head = config.vocab_size * d + d + config.hc_mult * config.hc_mult * d + config.hc_mult + 1
    activated = dense + head + config.n_layers * config.n_activated_experts * expert
    return ParamCount(total=dense + routed + embedding + head, activated=activated)


def _weight_kind(name: str, dtype: torch.dtype, dtypes: dict[str, torch.dtype]) -> str:
    """A tensor's storage kind; a ``.scale`` counts with the weight it scales (FP8 or FP4)."""
    if name.endswith(".scale"):
        dtype = dtypes[name.removesuffix(".scale") + ".weight"]
    return {
        torch.float8_e4m3fn: "fp8",
        torch.int8: "fp4",  # two e2m1 values per byte
        torch.bfloat16: "bf16",
        torch.float32: "fp32",
        torch.int64: "int64",
    }[dtype]


@dataclass(frozen=True)
class WeightBytes:
    """What a checkpoint of a config holds and what a decode step reads of it, from the tensor list alone,
    so that a user can size a machine before downloading 160 GB."""

    by_kind: dict[str, int]  # fp8 / fp4 / bf16 / fp32 / int64 -> bytes, scales included
    mtp: int  # of which the MTP block (read only when speculating)
    activated_per_token: int  # read by one decoded token of the main model: all but unrouted experts

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


_ROUTED_EXPERT = re.compile(r"\.ffn\.experts\.\d+\.")


def weight_bytes(config: ModelConfig) -> WeightBytes:
    """Bytes by storage kind of ``expected_tensors(config)``, and the bytes one decoded token reads: every
    tensor of the main model except the embedding table and hash-routing table (one row each) and the
    routed experts, of which each MoE layer reads its top-k."""
    tensors = expected_tensors(config)
    dtypes = {name: dtype for name, (_, dtype) in tensors.items()}
    by_kind: dict[str, int] = {}
    mtp = activated = routed = 0
    for name, (shape, dtype) in tensors.items():
        nbytes = math.prod(shape) * dtype.itemsize
        kind = _weight_kind(name, dtype, dtypes)
        by_kind[kind] = by_kind.get(kind, 0) + nbytes
        if name.startswith("mtp."):
            mtp += nbytes
        elif name in ("embed.weight",) or name.endswith("gate.tid2eid"):
            activated += nbytes // shape[0]
        elif _ROUTED_EXPERT.search(name):
            routed += nbytes
        else:
            activated += nbytes
    activated += routed * config.n_activated_experts // config.n_routed_experts
    return WeightBytes(by_kind=by_kind, mtp=mtp, activated_per_token=activated)


def rank_weight_bytes(config: ModelConfig, world_size: int) -> list[int]:
    """Weight bytes each of ``world_size`` tensor-parallel ranks holds: its slices of the split tensors, its
    routed experts and every replicated tensor (``dsv4.model.parallel.tensor_shard``'s layout)."""
    from dsv4.model.parallel import ParallelContext, tensor_shard

    tensors = expected_tensors(config)
    out = []
    for rank in range(world_size):
        parallel = ParallelContext(world_size, rank)
        held = 0
        for name, (shape, dtype) in tensors.items():
            shard = tensor_shard(name, config, parallel)
            if shard is not None:
                held += math.prod(shard.shape(shape)) * dtype.itemsize
        out.append(held)
    return out


@dataclass(frozen=True)
class ModelCosts:
    name: str
    config: ModelConfig
    context: int
    params: ParamCount
    activated_params: int  # the count the parameter FLOPs use
    activated_source: str  # "published" or "config"
    flops: Flops
    v32_flops: Flops

    def kv(self, mode: str = layout.PAPER) -> layout.TokenBytes:
        return layout.bytes_per_token(self.config, mode)

    @property
    def layer_counts(self) -> dict[str, int]:
        return {kind.value: sum(s.kind is kind for s in self.config.layers) for kind in LayerKind}

    @property
    def gqa8_kv(self) -> int:
        return gqa8_kv_bytes_per_token(self.config.n_layers)

    @property
    def vs_v32(self) -> dict[str, float]:
        return {
            "kv": float(self.kv().total / sum(V32.kv_bytes_per_token().values())),
            "flops": float(self.flops.fp8_equivalent / self.v32_flops.fp8_equivalent),
        }

    @property
    def vs_gqa8(self) -> dict[str, float]:
        return {"kv": float(self.kv().total / self.gqa8_kv)}

    def storage(self, mode: str) -> dict[str, Any]:
        per_token = self.kv(mode)
        return {
            "entry_bytes": layout.entry_format(self.config, mode).nbytes,
            "indexer_key_bytes": layout.indexer_key_format(self.config, mode).nbytes,
            "kv_bytes_per_token": float(per_token.total),
            "components": {k: float(v) for k, v in per_token.as_dict().items()},
            "state_bytes_per_sequence": layout.state_bytes_per_sequence(self.config, mode).total,
            "block_bytes": layout.block_bytes(self.config, mode).total,
            "sequence_bytes_at_context": layout.sequence_bytes(self.config, mode, self.context),
            # a prefix-cache checkpoint (state slot + a partial block's copy) and how often a long prompt
            # takes one with the engine's default 512-token chunks and 256-token blocks
            "checkpoint_bytes": layout.checkpoint_bytes(self.config, mode),
            "checkpoint_interval": layout.checkpoint_interval(self.config, mode, CHECKPOINT_GRID),
        }

    def to_json(self) -> dict[str, Any]:
        kv = self.kv()
        return {
            "layers": self.layer_counts,
            "kv_storage": layout.PAPER,
            "kv_bytes_per_token": float(kv.total),
            "kv_components": {k: float(v) for k, v in kv.as_dict().items()},
            "kv_bytes_at_context": float(kv.total * self.context),
            "flops_per_token": float(self.flops.fp8_equivalent),
            "flops_weighting": "fp8_equivalent",
            "flops_parts": self.flops.as_dict(),
            "activated_params": {
                "used": self.activated_params,
                "source": self.activated_source,
                "from_config": self.params.activated,
                "total_from_config": self.params.total,
            },
            "vs_v3.2": self.vs_v32,
            "vs_gqa8": self.vs_gqa8,
            "baselines": {
                "v3.2": {
                    "kv_bytes_per_token": sum(V32.kv_bytes_per_token().values()),
                    "flops_per_token": float(self.v32_flops.fp8_equivalent),
                    "flops_parts": self.v32_flops.as_dict(),
                },
                "gqa8": {"layers": self.config.n_layers, "kv_bytes_per_token": self.gqa8_kv},
            },
            "storage": {mode: self.storage(mode) for mode in layout.ALL_MODES},
        }


def model_costs(name: str, config: ModelConfig, context: int) -> ModelCosts:
    params = count_params(config)
    published = PUBLISHED_ACTIVATED_PARAMS.get(name)
    activated = published if published is not None else params.activated
    return ModelCosts(
        name=name,
        config=config,
        context=context,
        params=params,
        activated_params=activated,
        activated_source="published" if published is not None else "config",
        flops=v4_flops(config, context, activated),
        v32_flops=V32.flops(context),
    )


def costs_report(models: dict[str, ModelConfig], context: int) -> dict[str, Any]:
    """The ``--json`` object."""
    return {
        "context": context,
        "models": {name: model_costs(name, cfg, context).to_json() for name, cfg in models.items()},
    }


# ---------------------------------------------------------------------------------------------- tables
class Table(NamedTuple):
    title: str
    headers: list[str]
    rows: list[list[str]]
    text_columns: int = 1  # leading columns that are labels (left-aligned); the rest are numbers


def _pct(r: float | Fraction) -> str:
    return f"{100 * float(r):.3g}%"


def _gflop(x: Fraction) -> str:
    return f"{float(x) / 1e9:,.1f}"


def _bytes(x: float | Fraction) -> str:
    return f"{float(x):,.0f}" if x == int(x) else f"{float(x):,.2f}"


def _gib(x: float | Fraction) -> str:
    return f"{float(x) / GIB:,.2f}"


def kv_table(costs: list[ModelCosts], context: int, baselines: tuple[str, ...]) -> Table:
    """Ratio columns appear only for the chosen baselines; baseline rows leave them blank."""
    with_v32, with_gqa = "v3.2" in baselines, "gqa8" in baselines
    n_ratios = with_v32 + with_gqa
    rows = []
    if with_v32:
        v32 = V32.kv_bytes_per_token()
        total = sum(v32.values())
        rows.append(["V3.2", f"{V32.n_layers} DSA", _bytes(v32["mla_entries"]), _bytes(v32["indexer_keys"])])
        rows[-1] += ["-", _bytes(total), _gib(total * context)] + [""] * n_ratios
    for c in costs:
        kv, n = c.kv(), c.layer_counts
        rows.append([c.name, f"{n['window']}/{n['csa']}/{n['hca']}"])
        rows[-1] += [_bytes(b) for b in (kv.csa_entries, kv.indexer_keys, kv.hca_entries, kv.total)]
        rows[-1] += [_gib(kv.total * context)]
        rows[-1] += [_pct(c.vs_v32["kv"])] * with_v32 + [_pct(c.vs_gqa8["kv"])] * with_gqa
    if with_gqa:
        for layers in sorted({c.config.n_layers for c in costs}):
            total = gqa8_kv_bytes_per_token(layers)
            rows.append([f"GQA-8 x{layers}", str(layers), "-", "-", "-", _bytes(total), _gib(total * context)])
            rows[-1] += [""] * n_ratios
    headers = ["model", "win/CSA/HCA", "CSA/MLA entries", "idx keys", "HCA entries", "B/token", "GiB at L"]
    headers += ["vs V3.2"] * with_v32 + ["vs GQA-8"] * with_gqa
    return Table(f"KV cache per token at L = {context:,} (paper storage; bytes)", headers, rows, 2)


def flops_table(costs: list[ModelCosts], context: int, baselines: tuple[str, ...]) -> Table:
    """GQA-8 has no FLOPs figure: the report compares it on cache size only."""
    v32 = V32.flops(context)
    with_v32 = "v3.2" in baselines
    named = ([("V3.2", v32)] if with_v32 else []) + [(c.name, c.flops) for c in costs]
    rows = [
        [name]
        + [_gflop(x) for x in (f.parameters, f.core_attention, f.indexer, f.raw, f.fp8_equivalent)]
        + ([_pct(f.fp8_equivalent / v32.fp8_equivalent) if f is not v32 else ""] if with_v32 else [])
        for name, f in named
    ]
    headers = ["model", "params", "core attn", "indexer", "raw total", "FP8-equiv"] + ["vs V3.2"] * with_v32
    return Table(f"Decode GFLOP per token at L = {context:,} (parts raw)", headers, rows)


def _params(n: int) -> str:
    for suffix, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:,.2f}{suffix}"
    return str(n)


def params_table(costs: list[ModelCosts]) -> Table:
    rows = [
        [c.name, f"{_params(c.activated_params)} ({c.activated_source})"]
        + [_params(c.params.activated), _params(c.params.total)]
        for c in costs
    ]
    headers = ["model", "activated used", "activated (config)", "total (config)"]
    return Table("Parameters (parameter FLOPs = 2 x activated; config counts exclude MTP)", headers, rows, 2)


def storage_table(costs: list[ModelCosts], context: int) -> Table:
    rows = []
    for c in costs:
        paper = c.kv().total
        for mode in layout.ALL_MODES:
            s, per_token = c.storage(mode), c.kv(mode).total
            rows.append([c.name, mode, str(s["entry_bytes"]), str(s["indexer_key_bytes"]), _bytes(per_token)])
            rows[-1] += [f"{float(per_token / paper):.2f}x", f"{s['state_bytes_per_sequence'] / 2**20:,.1f}"]
            rows[-1] += [_gib(s["sequence_bytes_at_context"]), f"{s['checkpoint_bytes'] / 2**20:,.1f}"]
            rows[-1] += [f"{s['checkpoint_interval']:,}"]
    headers = ["model", "storage", "entry B", "key B", "B/token", "vs paper", "state MiB", "GiB at L"]
    headers += ["ckpt MiB", "ckpt every"]
    title = (
        f"Cache per storage form: dsv4's numerics modes, the paper, the official code; one sequence at "
        f"L = {context:,} (window rings + compressor state + {layout.DEFAULT_BLOCK_TOKENS}-token blocks)"
    )
    return Table(title, headers, rows, text_columns=2)


def render_tables(tables: list[Table], notes: tuple[str, ...]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table as RichTable
    except ImportError:
        print(render_plain(tables, notes))
        return
    console = Console()
    if not console.is_terminal:  # piped output: do not squeeze the tables into 80 columns
        console.width = 140
    for title, headers, rows, text_columns in tables:
        table = RichTable(title=title, title_justify="left")
        for i, header in enumerate(headers):
            table.add_column(header, justify="left" if i < text_columns else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print("Assumptions:")
    for note in notes:
        console.print(f"  - {note}", highlight=False)


def render_plain(tables: list[Table], notes: tuple[str, ...]) -> str:
    lines: list[str] = []
    for title, headers, rows, text_columns in tables:
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
        lines.append(title)
        for row in [headers, *rows]:
            cells = [
                c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
        lines.append("")
    lines.append("Assumptions:")
    lines += [f"  - {note}" for note in notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plot
@dataclass
class _Series:
    label: str
    color: str
    flops: list[float] | None  # GFLOP per token, or None when the series has no FLOPs panel line
    kv: list[float]  # GiB
    style: str = "-"


def _series(models: dict[str, ModelConfig], contexts: list[int], baselines: tuple[str, ...]) -> list[_Series]:
    styles = {"v4-pro": ("tab:blue", "V4-Pro"), "v4-flash": ("tab:orange", "V4-Flash")}
    spare = iter(["tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    out = []
    if "v3.2" in baselines:
        v32_kv = sum(V32.kv_bytes_per_token().values())
        out.append(
            _Series(
                "DeepSeek-V3.2",
                "tab:gray",
                [float(V32.flops(n).fp8_equivalent) / 1e9 for n in contexts],
                [v32_kv * n / GIB for n in contexts],
            )
        )
    for name, config in models.items():
        color, label = styles.get(name, (next(spare, "black"), name))
        costs = model_costs(name, config, contexts[-1])
        flops = [float(v4_flops(config, n, costs.activated_params).fp8_equivalent) / 1e9 for n in contexts]
        per_token = float(costs.kv().total)
        out.append(_Series(label, color, flops, [per_token * n / GIB for n in contexts]))
    if "gqa8" in baselines:
        layer_counts = sorted({c.n_layers for c in models.values()}, reverse=True)
        for layers, style in zip(layer_counts, itertools.cycle(["--", ":", "-."]), strict=False):
            per_token = gqa8_kv_bytes_per_token(layers)
            kv = [per_token * n / GIB for n in contexts]
            out.append(_Series(f"BF16 GQA-8 ({layers} layers)", "black", None, kv, style))
    return out


def plot(models: dict[str, ModelConfig], path: str | Path, context: int, baselines: tuple[str, ...]) -> None:
    """Two panels like the report's Figure 1: single-token FLOPs and accumulated KV cache against context,
    each line labelled at its right end with its value and its share of V3.2's."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state to disturb

    top = max(context, PLOT_MAX_CONTEXT)
    steps = 160
    contexts = sorted({round(PLOT_MIN_CONTEXT * (top / PLOT_MIN_CONTEXT) ** (i / steps)) for i in range(steps + 1)})
    series = _series(models, contexts, baselines)
    reference = series[0] if "v3.2" in baselines else None

    fig = Figure(figsize=(13, 5.4), layout="constrained")
    ax_flops, ax_kv = fig.subplots(1, 2)
    for s in series:
        for ax, ys, ref in (
            (ax_flops, s.flops, reference and reference.flops),
            (ax_kv, s.kv, reference and reference.kv),
        ):
            if ys is None:
                continue
            ax.plot(contexts, ys, label=s.label, color=s.color, lw=2.2, ls=s.style)
            end = f"{ys[-1]:,.{2 if ys[-1] < 10 else 1 if ys[-1] < 100 else 0}f}"
            if ref is not None and s is not reference and s.flops is not None:
                end += f" ({100 * ys[-1] / ref[-1]:.3g}%)"
            ax.annotate(end, (contexts[-1], ys[-1]), xytext=(5, 0), textcoords="offset points", va="center",
                        color=s.color, fontsize=9)  # fmt: skip

    ticks = [2**k for k in range(10, 41, 2) if 2**k <= top]
    for ax in (ax_flops, ax_kv):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [_short(t) for t in ticks])
        ax.set_xlim(contexts[0], top * 5)  # room for the end labels
        ax.set_xlabel("context length (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=9)
    ax_flops.set_title("Single-token inference FLOPs")
    ax_flops.set_ylabel("GFLOP per decoded token (FP8-equivalent)")
    ax_kv.set_title("Accumulated KV cache (paper's storage assumptions)")
    ax_kv.set_yscale("log")
    ax_kv.set_ylabel("KV cache of one sequence (GiB, log scale)")
    fig.suptitle(
        f"DeepSeek-V4 vs V3.2 per decoded token; right-hand labels: value at {_short(contexts[-1])} tokens "
        "and its share of V3.2's"
    )
    fig.savefig(path, dpi=130)


def _short(n: int) -> str:
    for suffix, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


# ---------------------------------------------------------------------------------------------- CLI
def load_models(names: list[str] | None) -> dict[str, ModelConfig]:
    return {name: load_config(name) for name in dict.fromkeys(names or PRESET_MODELS)}


def handle(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    baselines = tuple(dict.fromkeys(args.baseline or BASELINES))
    models = load_models(args.model)
    if args.json:
        print(json.dumps(costs_report(models, context), indent=2))
    else:
        costs = [model_costs(name, cfg, context) for name, cfg in models.items()]
        tables = [
            kv_table(costs, context, baselines),
            flops_table(costs, context, baselines),
            params_table(costs),
            storage_table(costs, context),
        ]
        render_tables(tables, ASSUMPTIONS)
    if args.plot:
        plot(models, args.plot, context, baselines)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "costs",
        help="KV-cache bytes and decode FLOPs per token vs DeepSeek-V3.2 and a BF16 GQA-8 model",
        description="Per-token KV-cache bytes and decode FLOPs of DeepSeek-V4 against DeepSeek-V3.2 and a "
        "BF16 GQA-8 model, with the assumptions that reproduce the report's 1M-token ratios.",
    )
    parser.add_argument(
        "--model", action="append", metavar="v4-flash|v4-pro|DIR",
        help="a preset or a model directory (repeatable; default: v4-flash and v4-pro)",
    )  # fmt: skip
    parser.add_argument(
        "--context", default=str(DEFAULT_CONTEXT), metavar="N",
        help="context length in tokens: 131072, 128K, 1M (= 2^20), 1e6 (default 1e6, where the report's "
             "'1M' ratios hold)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", action="append", choices=BASELINES,
        help="baseline(s) shown in the table and plot (repeatable; default both; --json always has both)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw FLOPs and KV cache against context")
    parser.set_defaults(func=handle)
