"""Run the shared reference-vector sets and a short generation on a CUDA device, when there is one.

    python benchmarks/device_check.py [--device cuda:0] [--sets DIR ...]

The CPU test suite proves the numerics; this proves the same code on an accelerator: every tensor the
model, the cache pool and the sampler create must live on the model's device (a stray CPU tensor fails
loudly on CUDA), and the vector sets must pass the manifest's own tiers there: fp32_nosim within
tolerance, the simulated modes at least the statistical tier (GPU GEMMs and reductions sum in other
orders than the CPU's). Exits 0 with a plain sentence when the machine has no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETS = (
    ROOT / "tests" / "data" / "reference",
    ROOT.parent / "shared" / "testvectors" / "reference",
    ROOT.parent / "shared" / "testvectors" / "decode_boundaries",
)


def check_sets(sets: list[Path], device: str) -> bool:
    from safetensors.torch import load_file

    from dsv4.commands.check_vectors import check_mode

    ok = True
    for vector_dir in sets:
        if not (vector_dir / "manifest.json").exists():
            print(f"{vector_dir}: no vector set here, skipped")
            continue
        manifest = json.loads((vector_dir / "manifest.json").read_text())
        vectors = load_file(vector_dir / manifest["vectors"]["file"])
        for mode in manifest["modes"]:
            for how, options in (("model", {}), ("engine, one ragged batch", {"batch": True})):
                start = time.perf_counter()
                result = check_mode(vector_dir, manifest, vectors, mode, **options, device=device)
                worst = max(p.max_abs for p in result.prompts)
                agree = min(p.argmax_agree for p in result.prompts)
                print(
                    f"{vector_dir.name:<18} {mode:<14} {how:<24} {result.tier:<12} max |diff| {worst:.3g}, "
                    f"argmax agreement >= {agree:.3f} ({time.perf_counter() - start:.1f} s)"
                )
                for problem in result.problems:
                    print(f"    FAIL: {problem}")
                ok &= result.passed
    return ok


def generate(device: str) -> bool:
    from dsv4.engine.llm import LLM
    from dsv4.engine.sampling import SamplingParams

    llm = LLM("tiny-random", device=device, progress=False)
    params = [SamplingParams(temperature=t, seed=7, max_tokens=32, ignore_eos=True) for t in (0.0, 0.8)]
    start = time.perf_counter()
    outs = llm.generate(["The cache of a million tokens", "An agent calls a tool"], params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    print(f"generation on {device}: {tokens} tokens in {elapsed:.2f} s; pool on {llm.pool.device}")
    return all(len(o.token_ids) == 32 for o in outs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sets", nargs="*", type=Path, default=list(DEFAULT_SETS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"No CUDA device on this machine (torch {torch.__version__}): nothing to check here.")
        return 0
    print(f"device: {torch.cuda.get_device_name(torch.device(args.device))}")
    ok = check_sets(args.sets, args.device) and generate(args.device)
    print("all checks passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
