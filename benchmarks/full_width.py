"""V4-Flash at its real width: load, prefill and decode two full-size layers, and project to the whole model.

    python benchmarks/full_width.py [--dir DIR] [--prefill 4096] [--decode 16] [--threads 2]

Writes (once, then reuses) a random, healthy checkpoint in the official sharded HF format with V4-Flash's
exact dimensions (``../shared/configs/v4-flash.config.json``: hidden 4096, 64 heads of 512, 256 routed FP4
experts top-6, indexer 64 heads top-512, vocabulary 129,280) and two layers: one CSA, one HCA (the first
hash-routed, as V4's first layers are). Then, in this process:

* load time, and peak RSS against the checkpoint's tensor bytes (the weights stay in their FP8/FP4 form);
* prefill tokens/s of one prompt, and batch-1 decode tokens/s;
* the bytes one decode step must read (the activated weights, the head, the cache), the machine's measured
  read bandwidth, and the fraction of that bound the decode reaches;
* the projection to the 43-layer V4-Flash: weight memory, and decode tokens/s per 100 GB/s of bandwidth
  at the fraction reached here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from dsv4.cache import layout
from dsv4.checkpoint import CONFIG_NAME, INDEX_NAME, _name_order, _plan_shards, expected_tensors
from dsv4.config import FP4_BLOCK, ModelConfig
from dsv4.costs import weight_bytes
from dsv4.numerics.formats import FP4_VALUES, float_to_e8m0
from dsv4.tiny import _plain, _quantised_linear, cache_dir

ROOT = Path(__file__).resolve().parents[1]
FLASH_CONFIG = ROOT.parent / "shared" / "configs" / "v4-flash.config.json"
SHARD_BYTES = 2 * 1024**3
GB = 10**9
# Mean square of the 16 e2m1 codes drawn uniformly: what a random FP4 weight's scale is divided by.
FP4_MEAN_SQUARE = sum(v * v for v in FP4_VALUES) / len(FP4_VALUES)


def flash_two_layers() -> ModelConfig:
    """V4-Flash with one CSA and one HCA layer (hash-routed first, as in V4), no MTP block."""
    flash = ModelConfig.from_file(FLASH_CONFIG)
    return flash.replace(n_layers=2, n_hash_layers=1, n_mtp_layers=0, compress_ratios=(4, 128))


def _random_fp4(rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A routed expert's weight drawn directly in its stored form: uniform e2m1 codes, and per-32 scales
    that give it a variance of about 1/fan_in. Drawing fp32 values and quantising 768 such matrices would
    take minutes; this takes seconds and is as healthy for a benchmark."""
    packed = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8).view(torch.int8)
    std = 1 / math.sqrt(cols * FP4_MEAN_SQUARE)
    jitter = torch.exp2(torch.randint(-1, 1, (rows, cols // FP4_BLOCK), generator=g).float())
    scale = 2.0 ** round(math.log2(std)) * jitter
    return packed, float_to_e8m0(scale)


def write_checkpoint(path: Path, config: ModelConfig, seed: int = 0) -> None:
    """Stream a random checkpoint to ``path`` shard by shard: one shard in memory at a time."""
    g = torch.Generator().manual_seed(seed)
    specs = expected_tensors(config)
    names = sorted(specs, key=_name_order)
    sizes = {k: math.prod(specs[k][0]) * specs[k][1].itemsize for k in names}
    shards = _plan_shards(names, sizes, SHARD_BYTES, None)
    path.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="writing") as bar:
        drawn: dict[str, torch.Tensor] = {}  # a weight and its scale are drawn together, maybe across shards
        for i, shard in enumerate(shards):
            for name in shard:
                if name in drawn:
                    continue
                weight_name = name.removesuffix(".scale") + ".weight" if name.endswith(".scale") else name
                shape, dtype = specs[weight_name]
                scale = weight_name.removesuffix("weight") + "scale"
                if scale in specs:
                    if dtype == torch.int8:
                        drawn[weight_name], drawn[scale] = _random_fp4(shape[0], shape[1] * 2, g)
                    else:
                        drawn[weight_name], drawn[scale] = _quantised_linear(weight_name, shape, dtype, g)
                else:
                    drawn[name] = _plain(name, shape, config, g).to(dtype)
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: drawn.pop(k) for k in shard}, path / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            bar.update(sum(sizes[k] for k in shard))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (path / CONFIG_NAME).write_text(json.dumps(config.to_hf(), indent=2) + "\n")


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs), so the peak is the loader's, not the writer's."""
    Path("/proc/self/clear_refs").write_text("5")


def read_bandwidth(threads: int, nbytes: int = 2 * GB) -> float:
    """Bytes/s that a reduction over a buffer far larger than the caches streams at ``threads`` threads."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=cache_dir() / "full-width-flash-2l")
    parser.add_argument("--prefill", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=16, help="decode steps timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--numerics", default="bf16_official")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = flash_two_layers()
    weights = weight_bytes(config)
    if not (args.dir / INDEX_NAME).exists():
        print(f"writing a random 2-layer V4-Flash checkpoint ({weights.total / GB:.2f} GB) to {args.dir}")
        write_checkpoint(args.dir, config)

    from dsv4.engine.llm import LLM
    from dsv4.engine.sampling import SamplingParams

    reset_peak_rss()
    rss_before = _rss("VmRSS")
    start = time.perf_counter()
    llm = LLM(
        args.dir,
        args.numerics,
        max_num_seqs=1,
        num_blocks=layout.blocks_for(args.prefill + args.decode + 1, layout.DEFAULT_BLOCK_TOKENS),
        chunk_size=args.prefill,
        prefix_cache=False,
    )
    load_s = time.perf_counter() - start
    peak = _rss("VmHWM") - rss_before
    resident = sum(t.nbytes for t in llm.model.state_dict().values())

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1000, config.vocab_size, (args.prefill,), generator=g).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.decode + 1, ignore_eos=True)
    llm.add_request(prompt, params)
    start = time.perf_counter()
    llm.step()  # the whole prompt in one chunk, and the first token
    prefill_s = time.perf_counter() - start
    steps = []
    while llm.has_unfinished:
        start = time.perf_counter()
        llm.step()
        steps.append(time.perf_counter() - start)
    decode_s = sorted(steps)[len(steps) // 2]  # the median step: one slow step on a shared machine is noise

    cache_read = layout.bytes_per_token(config, llm.numerics).total * (args.prefill + args.decode)
    step_bytes = weights.activated_per_token + float(cache_read)
    bandwidth = read_bandwidth(args.threads)
    fraction = step_bytes / decode_s / bandwidth
    flash = weight_bytes(ModelConfig.from_file(FLASH_CONFIG))
    rows = [
        ("checkpoint tensor bytes", f"{weights.total / GB:.2f} GB"),
        ("weights held by the model", f"{resident / GB:.2f} GB ({resident / weights.total:.3f}x)"),
        ("load time", f"{load_s:.1f} s"),
        ("peak RSS while loading", f"{peak / GB:.2f} GB ({peak / weights.total:.3f}x the checkpoint)"),
        (f"prefill, {args.prefill} tokens", f"{args.prefill / prefill_s:.1f} tokens/s ({prefill_s:.1f} s)"),
        ("decode, batch 1 (median step)", f"{1 / decode_s:.2f} tokens/s ({decode_s * 1e3:.0f} ms)"),
        ("bytes one decode step reads", f"{step_bytes / GB:.3f} GB (weights {weights.activated_per_token / GB:.3f})"),
        (f"read bandwidth, {args.threads} threads", f"{bandwidth / GB:.1f} GB/s"),
        ("fraction of the bandwidth bound", f"{fraction:.1%}"),
        ("V4-Flash (43 layers) weights", f"{flash.total / GB:.1f} GB"),
        (
            "V4-Flash decode per 100 GB/s",
            f"{100 * GB / flash.activated_per_token * fraction:.2f} tokens/s at this fraction "
            f"({100 * GB / flash.activated_per_token:.2f} at the bound)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nV4-Flash, 2 full-width layers, {args.numerics}, {args.threads} threads, {os.cpu_count()} CPUs")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
