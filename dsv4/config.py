"""Model configuration: a Hugging Face DeepSeek-V4 ``config.json`` read, validated and turned into the
per-layer schedule that the model, the cache and the costs arithmetic all share.

Field names follow the official ``inference/model.py`` ``ModelArgs`` (``dim``, ``n_heads``...), because the
math reads like the paper in those names; :meth:`ModelConfig.from_hf` maps the HF names onto them.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUANT_BLOCK = 128  # FP8 weight blocks are 128x128; activations are quantised in blocks of 128 along K
FP4_BLOCK = 32  # FP4 expert weights and FP4 indexer activations use 1x32 blocks
KV_FP8_BLOCK = 64  # the non-RoPE KV dims are FP8-simulated in blocks of 64
VALID_RATIOS = (0, 4, 128)

PRESETS_DIR = Path(__file__).parent / "presets"

# Errors name the field as it appears in config.json, not our internal name.
_HF_NAMES = {
    "dim": "hidden_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_heads": "num_attention_heads",
    "rope_head_dim": "qk_rope_head_dim",
    "window_size": "sliding_window",
    "n_hash_layers": "num_hash_layers",
    "n_activated_experts": "num_experts_per_tok",
}


class ConfigError(ValueError):
    """A config field has a value the model cannot be built from; the message names the field."""


class LayerKind(enum.StrEnum):
    WINDOW = "window"  # sliding window only (ratio 0)
    CSA = "csa"  # 4:1 overlapping compression + lightning indexer top-k (ratio 4)
    HCA = "hca"  # 128:1 compression, dense over all entries (ratio 128)


_KIND_OF_RATIO = {0: LayerKind.WINDOW, 4: LayerKind.CSA, 128: LayerKind.HCA}


def overlapping(ratio: int) -> bool:
    """Ratio-4 compression pools overlapping windows: each token projects two halves of features, and an entry
    pools the second halves of its window with the first halves of the previous one."""
    return ratio == 4


@dataclass(frozen=True)
class LayerSpec:
    """What one block is: its attention kind, its routing and its RoPE table."""

    index: int
    kind: LayerKind
    compress_ratio: int
    hash_routed: bool
    rope_theta: float
    yarn: bool  # YaRN frequency interpolation (compressed layers only, never window-only ones)

    @property
    def overlap(self) -> bool:
        return overlapping(self.compress_ratio)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    dim: int = 4096
    moe_inter_dim: int = 2048
    n_layers: int = 43
    n_hash_layers: int = 3
    n_mtp_layers: int = 1
    n_heads: int = 64
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    q_lora_rank: int = 1024
    head_dim: int = 512
    rope_head_dim: int = 64
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: tuple[int, ...] = field(default_factory=tuple)
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    original_seq_len: int = 65536
    rope_factor: float = 16.0
    beta_fast: int = 32
    beta_slow: int = 1
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    weight_dtype: str = "fp8"  # non-expert linears: "fp8" (e4m3 + 128x128 e8m0 scales) or "bf16"
    expert_dtype: str = "fp4"  # routed experts: "fp4" (e2m1 + 1x32 e8m0 scales), "fp8" or "bf16"
    hf: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers' DeepseekV4 field names)."""

        def need(key: str) -> Any:
            if key not in cfg:
                raise ConfigError(f"config.json: missing field '{key}'")
            return cfg[key]

        rope = cfg.get("rope_scaling") or {}
        if rope and rope.get("type", rope.get("rope_type")) not in ("yarn", None):
            raise ConfigError(f"config.json: rope_scaling.type must be 'yarn', got {rope.get('type')!r}")
        quant = cfg.get("quantization_config")
        if quant:
            if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
                raise ConfigError(f"config.json: unsupported quantization_config {quant!r}")
            if list(quant.get("weight_block_size", [128, 128])) != [QUANT_BLOCK, QUANT_BLOCK]:
                raise ConfigError(
                    f"config.json: quantization_config.weight_block_size must be [128, 128], "
                    f"got {quant.get('weight_block_size')!r}"
                )
        ratios = need("compress_ratios")
        if not isinstance(ratios, list | tuple) or not all(isinstance(r, int) for r in ratios):
            raise ConfigError(f"config.json: compress_ratios must be a list of integers, got {ratios!r}")
        return cls(
            vocab_size=need("vocab_size"),
            dim=need("hidden_size"),
            moe_inter_dim=need("moe_intermediate_size"),
            n_layers=need("num_hidden_layers"),
            n_hash_layers=cfg.get("num_hash_layers", 0),
            n_mtp_layers=cfg.get("num_nextn_predict_layers", 1),
            n_heads=need("num_attention_heads"),
            n_routed_experts=need("n_routed_experts"),
            n_shared_experts=cfg.get("n_shared_experts", 1),
            n_activated_experts=need("num_experts_per_tok"),
            score_func=cfg.get("scoring_func", "sqrtsoftplus"),
            route_scale=float(cfg.get("routed_scaling_factor", 1.0)),
            swiglu_limit=float(cfg.get("swiglu_limit", 0.0)),
            q_lora_rank=need("q_lora_rank"),
            head_dim=need("head_dim"),
            rope_head_dim=cfg.get("qk_rope_head_dim", 64),
            o_groups=need("o_groups"),
            o_lora_rank=need("o_lora_rank"),
            window_size=cfg.get("sliding_window", 128),
            compress_ratios=tuple(ratios),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            compress_rope_theta=float(cfg.get("compress_rope_theta", 160000.0)),
            original_seq_len=int(rope.get("original_max_position_embeddings", 0)) if rope else 0,
            rope_factor=float(rope.get("factor", 1.0)) if rope else 1.0,
            beta_fast=int(rope.get("beta_fast", 32)) if rope else 32,
            beta_slow=int(rope.get("beta_slow", 1)) if rope else 1,
            index_n_heads=cfg.get("index_n_heads", 64),
            index_head_dim=cfg.get("index_head_dim", 128),
            index_topk=cfg.get("index_topk", 512),
            hc_mult=cfg.get("hc_mult", 4),
            hc_sinkhorn_iters=cfg.get("hc_sinkhorn_iters", 20),
            hc_eps=float(cfg.get("hc_eps", 1e-6)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 1048576),
            bos_token_id=cfg.get("bos_token_id", 0),
            eos_token_id=cfg.get("eos_token_id", 1),
            weight_dtype="fp8" if quant else "bf16",
            # The initial Flash revision lacks expert_dtype at the root although its experts are FP4.
            expert_dtype=cfg.get("expert_dtype", "fp4" if quant else "bf16"),
            hf=dict(cfg),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(cfg)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """``v4-flash`` / ``v4-pro``: the real dimensions (for shapes and costs; no weights)."""
        path = PRESETS_DIR / f"{name}.json"
        if not path.exists():
            known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
        return cls.from_file(path)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict: the original one when loaded from a file, else rebuilt."""
        if self.hf:
            return dict(self.hf)
        cfg: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "moe_intermediate_size": self.moe_inter_dim,
            "num_hidden_layers": self.n_layers,
            "num_hash_layers": self.n_hash_layers,
            "num_nextn_predict_layers": self.n_mtp_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": 1,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.n_activated_experts,
            "scoring_func": self.score_func,
            "routed_scaling_factor": self.route_scale,
            "swiglu_limit": self.swiglu_limit,
            "q_lora_rank": self.q_lora_rank,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.rope_head_dim,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.window_size,
            "compress_ratios": list(self.compress_ratios),
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "norm_topk_prob": True,
            "topk_method": "noaux_tc",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "torch_dtype": "bfloat16",
            "expert_dtype": self.expert_dtype,
        }
        if self.original_seq_len > 0:
            cfg["rope_scaling"] = {
                "type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
            }
        if self.weight_dtype == "fp8":
            cfg["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "scale_fmt": "ue8m0",
                "activation_scheme": "dynamic",
                "weight_block_size": [QUANT_BLOCK, QUANT_BLOCK],
            }
        return cfg

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, hf={}, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, value: Any, why: str) -> ConfigError:
            return ConfigError(f"config field '{_HF_NAMES.get(name, name)}' = {value!r}: {why}")

        n_ratios = self.n_layers + self.n_mtp_layers
        if len(self.compress_ratios) != n_ratios:
            raise bad(
                "compress_ratios",
                list(self.compress_ratios),
                f"needs {n_ratios} entries (num_hidden_layers {self.n_layers} + "
                f"num_nextn_predict_layers {self.n_mtp_layers}), has {len(self.compress_ratios)}",
            )
        for i, r in enumerate(self.compress_ratios):
            if r not in VALID_RATIOS:
                raise bad(f"compress_ratios[{i}]", r, f"compress ratio must be one of {VALID_RATIOS}")
        for name in ("dim", "q_lora_rank", "moe_inter_dim", "o_lora_rank"):
            v = getattr(self, name)
            if v <= 0 or v % QUANT_BLOCK:
                raise bad(name, v, f"must be a positive multiple of {QUANT_BLOCK} (quantisation blocks)")
        if self.rope_head_dim <= 0 or self.rope_head_dim % 2:
            raise bad("qk_rope_head_dim", self.rope_head_dim, "must be a positive even number")
        nope = self.head_dim - self.rope_head_dim
        if nope <= 0 or nope % KV_FP8_BLOCK:
            raise bad(
                "head_dim",
                self.head_dim,
                f"head_dim - qk_rope_head_dim = {nope} must be a positive multiple of {KV_FP8_BLOCK} (FP8 KV blocks)",
            )
        if self.n_heads * self.head_dim % (self.o_groups * QUANT_BLOCK):
            raise bad(
                "o_groups",
                self.o_groups,
                f"n_heads*head_dim = {self.n_heads * self.head_dim} must split into o_groups groups "
                f"of a multiple of {QUANT_BLOCK}",
            )
        if self.n_heads % self.o_groups:
            raise bad("o_groups", self.o_groups, f"must divide num_attention_heads ({self.n_heads})")
        idx = self.index_head_dim
        if idx <= self.rope_head_dim or idx % FP4_BLOCK or idx & (idx - 1):
            raise bad(
                "index_head_dim",
                idx,
                f"must be a power of two, a multiple of {FP4_BLOCK} and larger than qk_rope_head_dim",
            )
        if (self.index_n_heads * idx) % QUANT_BLOCK:
            raise bad(
                "index_n_heads", self.index_n_heads, f"index_n_heads*index_head_dim must be a multiple of {QUANT_BLOCK}"
            )
        if self.window_size <= 0:
            raise bad("sliding_window", self.window_size, "must be positive")
        if not 0 < self.n_activated_experts <= self.n_routed_experts:
            raise bad("num_experts_per_tok", self.n_activated_experts, f"must be in 1..{self.n_routed_experts}")
        if self.n_shared_experts != 1:
            raise bad("n_shared_experts", self.n_shared_experts, "V4 has exactly one shared expert")
        if self.score_func != "sqrtsoftplus":
            raise bad("scoring_func", self.score_func, "only 'sqrtsoftplus' is used by V4")
        if not 0 <= self.n_hash_layers <= self.n_layers:
            raise bad("num_hash_layers", self.n_hash_layers, f"must be in 0..{self.n_layers}")
        if self.weight_dtype not in ("fp8", "bf16"):
            raise bad("quantization_config", self.weight_dtype, "weights must be fp8 or bf16")
        if self.expert_dtype not in ("fp4", "fp8", "bf16"):
            raise bad("expert_dtype", self.expert_dtype, "must be 'fp4', 'fp8' or 'bf16'")
        if self.index_topk <= 0:
            raise bad("index_topk", self.index_topk, "must be positive")
        if self.hc_mult <= 0 or self.hc_sinkhorn_iters <= 0:
            raise bad("hc_mult", self.hc_mult, "hc_mult and hc_sinkhorn_iters must be positive")

    # ------------------------------------------------------------------ schedule
    def layer(self, index: int) -> LayerSpec:
        """Layer ``index`` in 0..n_layers-1 is a main block; n_layers.. are the MTP blocks."""
        ratio = self.compress_ratios[index]
        mtp = index >= self.n_layers
        return LayerSpec(
            index=index,
            kind=_KIND_OF_RATIO[ratio],
            compress_ratio=ratio,
            hash_routed=not mtp and index < self.n_hash_layers,
            rope_theta=self.compress_rope_theta if ratio else self.rope_theta,
            yarn=bool(ratio) and self.original_seq_len > 0,
        )

    @property
    def layers(self) -> list[LayerSpec]:
        return [self.layer(i) for i in range(self.n_layers)]

    @property
    def mtp_layers(self) -> list[LayerSpec]:
        return [self.layer(self.n_layers + i) for i in range(self.n_mtp_layers)]

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def describe(self) -> str:
        """A one-screen summary of the schedule, for ``dsv4 info`` and error messages."""
        rows = [
            f"{'layer':>5}  {'attention':<9} {'ratio':>5}  {'routing':<6}  rope",
        ]
        for spec in self.layers + self.mtp_layers:
            name = str(spec.index) if spec.index < self.n_layers else f"mtp{spec.index - self.n_layers}"
            rope = f"{spec.rope_theta:g}" + (" +YaRN" if spec.yarn else "")
            routing = "hash" if spec.hash_routed else "score"
            rows.append(f"{name:>5}  {spec.kind.value:<9} {spec.compress_ratio:>5}  {routing:<6}  {rope}")
        return "\n".join(rows)


def load_config(model: str | Path) -> ModelConfig:
    """A preset name (``v4-flash``, ``v4-pro``) or a model directory / config.json path."""
    if isinstance(model, str) and (PRESETS_DIR / f"{model}.json").exists():
        return ModelConfig.preset(model)
    return ModelConfig.from_file(model)
