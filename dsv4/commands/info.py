"""``dsv4 info MODEL``: the layer schedule and the sizes that follow from a config (preset or directory):
weights by storage kind, the bytes a decoded token reads, and the cache per token."""

from __future__ import annotations

import argparse

from dsv4.cache.layout import bytes_per_token, state_bytes_per_sequence
from dsv4.config import load_config
from dsv4.costs import rank_weight_bytes, weight_bytes

GB = 10**9


def run(args: argparse.Namespace) -> int:
    config = load_config(args.model)
    kinds = [spec.kind.value for spec in config.layers]
    print(
        f"{args.model}: {config.n_layers} layers ({kinds.count('window')} window-only, {kinds.count('csa')} CSA, "
        f"{kinds.count('hca')} HCA) + {config.n_mtp_layers} MTP; dim {config.dim}, {config.n_heads} heads x "
        f"{config.head_dim}, {config.n_routed_experts} experts (top {config.n_activated_experts}), "
        f"vocab {config.vocab_size}"
    )
    print(config.describe())
    weights = weight_bytes(config)
    kinds = ", ".join(
        f"{kind.upper()} {n / GB:,.2f}" for kind, n in sorted(weights.by_kind.items(), key=lambda kv: -kv[1])
    )
    print(f"weights: {weights.total / GB:,.2f} GB ({kinds}; scales counted with their weights)")
    print(f"  of which the MTP block: {weights.mtp / GB:,.2f} GB")
    print(
        f"  read per decoded token: {weights.activated_per_token / GB:,.2f} GB (all but the unrouted experts), "
        f"at most {100 * GB / weights.activated_per_token:,.1f} tokens/s per 100 GB/s of memory bandwidth"
    )
    if args.tp > 1:
        ranks = rank_weight_bytes(config, args.tp)
        held = ", ".join(f"{n / GB:,.2f}" for n in ranks)
        print(
            f"  per rank with --tp {args.tp}: {held} GB (split tensors and owned experts 1/{args.tp} each, "
            f"the rest replicated; each rank also holds the whole KV cache)"
        )
    for mode in ("bf16_official", "fp32_nosim"):
        per_token = float(bytes_per_token(config, mode).total)
        state = state_bytes_per_sequence(config, mode).total
        print(f"cache ({mode}): {per_token:,.1f} B per token + {state / 2**20:,.1f} MiB fixed state per sequence")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's layer schedule and cache sizes")
    p.add_argument("model", help="a preset (v4-flash, v4-pro) or a directory with config.json")
    p.add_argument("--tp", type=int, default=1, help="also show the weight bytes per rank split over N processes")
    p.set_defaults(func=run)
