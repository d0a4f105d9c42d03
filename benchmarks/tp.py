"""Tensor parallelism on one machine: step time, memory per rank and communication per decode step, for
N = 1, 2, 4 ranks on the engine benchmark's ``small`` config (``benchmarks/engine.py``).

    python benchmarks/tp.py --ranks 1,2,4 --context 2048 --decode-tokens 16

Each N runs ``LLM(tp=N)`` (rank 0 in this process, the others spawned) with the machine's threads shared
out: ``--threads`` in all (default: torch's count), ``threads // N`` per rank, at least one. On a CPU the
ranks share the same cores and memory bandwidth, so this measures what splitting costs and saves, not
the speed of N machines. Memory is what each rank holds: its weight tensors (measured from the model's
state), its replica of the KV pool (V4 caches one KV head, so every rank holds the whole cache) and its
resident set. Communication is counted on rank 0 during the decode steps: the bytes every collective of
the forward moves (each rank moves the same), and the pickled plan rank 0 broadcasts.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from engine import CONFIGS

from dsv4 import LLM, SamplingParams
from dsv4.cache import layout
from dsv4.tiny import tiny_config, write_random_checkpoint

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class Traffic:
    """Bytes through each collective while ``counting``; the plan's pickled size for the plans."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.counting = False
        for name in COLLECTIVES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))
        dist.broadcast_object_list = self._wrap_plans(dist.broadcast_object_list)

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.counting:
                self.bytes[name] += _nbytes(args[0]) if name != "all_gather" else _nbytes(args[1])
            return fn(*args, **kwargs)

        return counted

    def _wrap_plans(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(objects: list[Any], *args: Any, **kwargs: Any) -> Any:
            if self.counting:
                self.bytes["plan (pickled)"] += len(pickle.dumps(objects[0]))
            return fn(objects, *args, **kwargs)

        return counted


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def bench(path: Path, ranks: int, context: int, decode: int, threads: int, traffic: Traffic) -> dict[str, Any]:
    torch.set_num_threads(max(1, threads // ranks))
    blocks = layout.blocks_for(context + decode + 1)
    with LLM(path, "fp32_nosim", tp=ranks, max_num_seqs=1, num_blocks=blocks, progress=False) as llm:
        assert llm.model is not None and llm.pool is not None
        llm.warm_up()  # the compiled mHC loop, on every rank: not part of a step's time
        prompt = torch.randint(2, llm.config.vocab_size, (context,), generator=torch.Generator().manual_seed(0))
        params = SamplingParams(temperature=0.0, max_tokens=decode + 1, ignore_eos=True)
        request = llm.add_request(prompt.tolist(), params)
        seq = llm._requests[request]
        start = time.perf_counter()
        while not seq.output_ids:
            llm.step()
        prefill = time.perf_counter() - start
        traffic.bytes.clear()
        traffic.counting = True
        start = time.perf_counter()
        while llm.has_unfinished:
            llm.step()
        step = (time.perf_counter() - start) / decode
        traffic.counting = False
        workers = llm.replicas._processes if llm.replicas is not None else []
        return {
            "prefill tok/s": context / prefill,
            "decode ms/step": 1e3 * step,
            "weights MB/rank": sum(t.nbytes for t in llm.model.state_dict().values()) / 1e6,
            "pool MB/rank": llm.pool.allocated_bytes() / 1e6,
            "RSS MB/rank": [_rss(os.getpid()) / 1e6, *(_rss(p.pid) / 1e6 for p in workers)],
            "comm KB/decode step": {k: v / decode / 1e3 for k, v in sorted(traffic.bytes.items())},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4", help="comma-separated tensor-parallel degrees")
    parser.add_argument("--context", type=int, default=2048, help="prompt length before the decode steps")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads shared by all ranks")
    args = parser.parse_args()
    traffic = Traffic()
    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(**CONFIGS["small"], max_position_embeddings=2 * (args.context + args.decode_tokens))
        path = write_random_checkpoint(Path(tmp) / "ckpt", config)
        print(f"config: small, context {args.context}, {args.decode_tokens} decode steps, {args.threads} threads")
        base = None
        for n in (int(r) for r in args.ranks.split(",")):
            result = bench(path, n, args.context, args.decode_tokens, args.threads, traffic)
            base = base or result
            rss = ", ".join(f"{m:.0f}" for m in result["RSS MB/rank"])
            comm = ", ".join(f"{k} {v:.1f}" for k, v in result["comm KB/decode step"].items()) or "none"
            print(
                f"tp={n}: prefill {result['prefill tok/s']:.0f} tok/s, decode {result['decode ms/step']:.1f} ms/step "
                f"({base['decode ms/step'] / result['decode ms/step']:.2f}x tp=1); weights "
                f"{result['weights MB/rank']:.1f} MB/rank ({result['weights MB/rank'] / base['weights MB/rank']:.2f}"
                f" of tp=1), pool {result['pool MB/rank']:.1f} MB/rank, RSS MB per rank [{rss}]"
            )
            print(f"      communication per decode step (KB): {comm}")


if __name__ == "__main__":
    main()
