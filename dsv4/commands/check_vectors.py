"""``dsv4 check-vectors DIR``: run a reference-vector set (the format of the official-reference vectors:
a checkpoint, prompts with teacher-forced decode tokens, reference logits per numerics mode, kernel vectors
and a manifest with the tolerance rules) and judge every mode by the manifest's own rules.

Tiers, as the manifest defines them: ``fp32_nosim`` must be within ``atol`` on every row with identical
argmax. The simulated modes are "exact" when the max difference is within the exact-tier bound (the
official arithmetic order reproduced), otherwise "statistical" when the mean difference and the argmax
agreement are within the statistical bounds (FP8/FP4 rounding flips cascade, so per-element bounds would
be meaningless), otherwise they fail.

Non-finite logits fail in every tier: every bound is checked as ``not (value <= bound)``, so a NaN (which
compares false with everything) is out of bounds, and rows holding NaN or inf are reported as such.

The engine paths (``--chunk``, ``--batch``, ``--reuse``) run each prompt plus its decode tokens as one
sequence, which the engine bounds by the checkpoint's ``max_position_embeddings``; a vector set longer than
that is refused with a one-line error (the bare-model path has no such bound and still runs it).
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dsv4.cache.contiguous import ContiguousCache
from dsv4.checkpoint import open_checkpoint_config
from dsv4.device import resolve_device
from dsv4.model.batch import Span
from dsv4.model.hyper import sinkhorn_split
from dsv4.model.loading import load_model
from dsv4.model.sparse_attention import sparse_attention
from dsv4.numerics import gemm
from dsv4.numerics.formats import act_quant, fp4_simulate, fp8_simulate, hadamard


@dataclass
class PromptResult:
    prompt: int
    max_abs: float
    mean_abs: float
    row_max: list[float]  # row 0: last prefill position; row j: after decode token j-1
    row_argmax_equal: list[bool]
    nonfinite_rows: list[int] = field(default_factory=list)  # rows of ours holding a NaN or an inf

    @property
    def argmax_agree(self) -> float:
        return sum(self.row_argmax_equal) / len(self.row_argmax_equal)


@dataclass
class ModeResult:
    mode: str
    prompts: list[PromptResult]
    tier: str = ""  # "exact", "statistical", "within atol" or "FAIL"
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.tier != "FAIL"


def compare(prompt: int, mine: torch.Tensor, ref: torch.Tensor) -> PromptResult:
    """Differences per row. NaN propagates through every reduction here (torch's max and mean keep it), so
    a NaN anywhere in ``mine`` or ``ref`` shows in the row's max and the prompt's max and mean."""
    if mine.shape != ref.shape:
        raise ValueError(f"prompt {prompt}: logits of shape {tuple(mine.shape)}, the reference has {tuple(ref.shape)}")
    diff = (mine.float() - ref.float()).abs()
    return PromptResult(
        prompt=prompt,
        max_abs=diff.max().item(),
        mean_abs=diff.mean().item(),
        row_max=diff.amax(dim=-1).tolist(),
        row_argmax_equal=(mine.argmax(-1) == ref.argmax(-1)).tolist(),
        nonfinite_rows=(~torch.isfinite(mine.float())).any(dim=-1).nonzero().flatten().tolist(),
    )


def within(value: float, bound: float) -> bool:
    """``value <= bound``, false for NaN: written this way round so that no NaN ever passes a check."""
    return value <= bound


def judge(mode: str, prompts: list[PromptResult], tolerances: dict) -> ModeResult:
    rule = tolerances[mode]
    result = ModeResult(mode, prompts)
    for p in prompts:
        if p.nonfinite_rows:
            result.problems.append(f"prompt {p.prompt}: NaN or inf logits on rows {p.nonfinite_rows}")
    if "atol" in rule:
        for p in prompts:
            bad_rows = [i for i, m in enumerate(p.row_max) if not within(m, rule["atol"])]
            bad_argmax = [i for i, ok in enumerate(p.row_argmax_equal) if not ok]
            if bad_rows:
                result.problems.append(f"prompt {p.prompt}: rows {bad_rows} exceed atol {rule['atol']}")
            if bad_argmax:
                result.problems.append(f"prompt {p.prompt}: argmax differs on rows {bad_argmax}")
        result.tier = "FAIL" if result.problems else "within atol"
        return result
    if not result.problems and all(within(p.max_abs, rule["exact_tier_atol"]) for p in prompts):
        result.tier = "exact"
        return result
    for p in prompts:
        if not within(p.mean_abs, rule["statistical_mean_abs"]):
            result.problems.append(f"prompt {p.prompt}: mean |diff| {p.mean_abs:.4g} > {rule['statistical_mean_abs']}")
        if not within(rule["statistical_min_argmax_agree"], p.argmax_agree):
            result.problems.append(
                f"prompt {p.prompt}: argmax agreement {p.argmax_agree:.3f} < {rule['statistical_min_argmax_agree']}"
            )
    result.tier = "FAIL" if result.problems else "statistical"
    return result


def model_logits(
    ckpt: Path, mode: str, prompts: list[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """The reference protocol on the bare model: one-call prefill, then one decode token per call."""
    model = load_model(ckpt, mode, progress=False, device=device)
    out = []
    for ids, decode in prompts:
        cache = ContiguousCache(model.n_cache_layers, model.config.window_size, model.numerics.dtype)
        rows = [model(ids.to(model.device), [Span(0, len(ids), 0, cache)]).logits[0]]
        for j, token in enumerate(decode.tolist()):
            step = torch.tensor([token], device=model.device)
            rows.append(model(step, [Span(0, 1, len(ids) + j, cache)]).logits[0])
        out.append(torch.stack(rows).cpu())
    return out


def check_mode(
    vector_dir: Path,
    manifest: dict,
    vectors: dict,
    mode: str,
    chunk: int | None = None,
    batch: bool = False,
    reuse: int | None = None,
    device: str | torch.device = "cpu",
    tp: int = 1,
) -> ModeResult:
    n_prompts = len(manifest["prompts"])
    prompts = [(vectors[f"prompt{i}.input_ids"], vectors[f"prompt{i}.decode_ids"]) for i in range(n_prompts)]
    if chunk is None and not batch and reuse is None:
        logits = model_logits(vector_dir / manifest["checkpoint"]["dir"], mode, prompts, device)
    else:
        from dsv4.engine.vectors import run_vectors_through_engine

        by_prompt = run_vectors_through_engine(
            vector_dir, mode, chunk=chunk, batch=batch, reuse=reuse, device=device, tp=tp
        )
        logits = [by_prompt[i] for i in range(n_prompts)]
    results = [compare(i, logits[i], vectors[f"prompt{i}.{mode}.logits"]) for i in range(n_prompts)]
    return judge(mode, results, manifest["tolerances"])


@dataclass
class KernelResult:
    name: str
    max_abs: float
    bound: float
    mean_abs: float = 0.0
    mean_bound: float | None = None

    @property
    def passed(self) -> bool:
        return within(self.max_abs, self.bound) and (self.mean_bound is None or within(self.mean_abs, self.mean_bound))


def check_kernels(path: Path) -> list[KernelResult]:
    """The kernel-level vectors: quantisers and GEMMs exact, sparse attention and Sinkhorn within bounds."""
    k = load_file(path)

    def exact(name: str, mine: torch.Tensor, ref: torch.Tensor) -> KernelResult:
        return KernelResult(name, (mine.float() - ref.float()).abs().max().item(), 0.0)

    q, s = act_quant(k["act_quant.x"], 128)
    results = [
        exact("act_quant.q", q, k["act_quant.q"]),
        exact("act_quant.s", s, k["act_quant.s"]),
    ]
    x = k["kv_fp8_sim.x"]
    nope = x.shape[-1] - 64
    results.append(
        exact("kv_fp8_sim.y", torch.cat([fp8_simulate(x[:, :nope], 64), x[:, nope:]], -1), k["kv_fp8_sim.y"])
    )
    results.append(exact("fp4_sim.y", fp4_simulate(k["fp4_sim.x"]), k["fp4_sim.y"]))
    results.append(exact("hadamard.y", hadamard(k["hadamard.x"]), k["hadamard.y"]))
    for name, linear in (("fp8_linear", gemm.fp8_linear), ("fp4_linear", gemm.fp4_linear)):
        x = k[f"{name}.x"]  # the model's own path: simulated activations through the compact-weight GEMM
        q, s = act_quant(x, 128)
        y = linear(q.float(), s, k[f"{name}.weight"], k[f"{name}.weight_scale"]).to(x.dtype)
        results.append(exact(f"{name}.y", y, k[f"{name}.y"]))
    o = sparse_attention(
        k["sparse_attn.q"][0],
        k["sparse_attn.kv"][0],
        k["sparse_attn.topk_idxs"][0].long(),
        k["sparse_attn.attn_sink"],
        k["sparse_attn.softmax_scale"].item(),
    )
    diff = (o.float() - k["sparse_attn.o"][0].float()).abs()
    results.append(KernelResult("sparse_attn.o", diff.max().item(), 1.6e-2, diff.mean().item(), 2e-3))
    hc = k["hc_split_sinkhorn.pre"].shape[-1]
    pre, post, comb = sinkhorn_split(
        k["hc_split_sinkhorn.mixes"], k["hc_split_sinkhorn.hc_scale"], k["hc_split_sinkhorn.hc_base"], hc, 20, 1e-6
    )
    for name, mine in (("pre", pre), ("post", post), ("comb", comb)):
        diff = (mine - k[f"hc_split_sinkhorn.{name}"]).abs().max().item()
        results.append(KernelResult(f"hc_split_sinkhorn.{name}", diff, 1e-6))
    return results


def run(args: argparse.Namespace) -> int:
    vector_dir = Path(args.dir)
    manifest_path = vector_dir / "manifest.json"
    if not manifest_path.exists():
        raise ValueError(f"{vector_dir} is not a vector set: no manifest.json")
    manifest = json.loads(manifest_path.read_text())
    modes = args.mode or list(manifest["modes"])
    unknown = [m for m in modes if m not in manifest["modes"]]
    if unknown:
        raise ValueError(f"mode(s) {unknown} not in this vector set; it has {list(manifest['modes'])}")
    resolve_device(args.device)
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    if args.tp > 1 and args.reuse is None and not args.chunk and not args.batch:
        raise ValueError("--tp runs through the engine: add --batch, --chunk N or --reuse")
    vectors = load_file(vector_dir / manifest["vectors"]["file"])
    if args.reuse is not None or args.chunk or args.batch:
        check_engine_fits(vector_dir, manifest, vectors)
    failed = False
    runs: list[tuple[str, dict[str, Any]]]
    if args.reuse is not None:
        runs = [
            (f"engine, reusing a cached prefix of {n} tokens", {"reuse": n})
            for n in _reuse_lengths(args, manifest, vectors)
        ]
    elif args.chunk:
        runs = [(f"engine, prefill chunks of {args.chunk}", {"chunk": args.chunk})]
    elif args.batch:
        runs = [("engine, one ragged batch", {"batch": True})]
    else:
        runs = [("model", {})]
    for mode, (how, options) in itertools.product(modes, runs):
        result = check_mode(vector_dir, manifest, vectors, mode, **options, device=args.device, tp=args.tp)
        print(f"{mode} ({how}): {result.tier}")
        for p in result.prompts:
            decode = p.row_max[1:]
            print(
                f"  prompt {p.prompt}: max |diff| {p.max_abs:.3g}, mean {p.mean_abs:.3g}, argmax agreement "
                f"{p.argmax_agree:.3f}; prefill row max {p.row_max[0]:.3g} (argmax "
                f"{'same' if p.row_argmax_equal[0] else 'DIFFERENT'}); decode rows max {max(decode):.3g}"
            )
            steps = " ".join(f"{m:.1e}" for m in decode)
            marks = "".join("." if ok else "x" for ok in p.row_argmax_equal[1:])
            print(f"    decode max |diff| per step: {steps}")
            print(f"    decode argmax per step ('.' same, 'x' different): {marks}")
        for problem in result.problems:
            print(f"  FAIL: {problem}")
        failed |= not result.passed
    if not args.no_kernels:
        print("kernels:")
        for k in check_kernels(vector_dir / "kernels.safetensors"):
            bound = "exact" if k.bound == 0 else f"<= {k.bound:g}"
            status = "ok" if k.passed else "FAIL"
            print(f"  {k.name:<24} max |diff| {k.max_abs:.3g} ({bound}) {status}")
            failed |= not k.passed
    print("FAILED" if failed else "all checks passed")
    return 1 if failed else 0


def check_engine_fits(vector_dir: Path, manifest: dict, vectors: dict) -> None:
    """Refuse, in one line, a vector set the engine cannot run: it generates ``len(decode) + 1`` tokens after
    each prompt, and a sequence ends when it fills the checkpoint's ``max_position_embeddings``."""
    limit = open_checkpoint_config(vector_dir / manifest["checkpoint"]["dir"]).max_position_embeddings
    for i in range(len(manifest["prompts"])):
        prompt, decode = len(vectors[f"prompt{i}.input_ids"]), len(vectors[f"prompt{i}.decode_ids"])
        if prompt + decode + 1 > limit:
            raise ValueError(
                f"prompt {i} needs {prompt + decode + 1} positions ({prompt} prompt + {decode} decode tokens + 1) "
                f"but the checkpoint's max_position_embeddings is {limit}: the engine paths (--chunk, --batch, "
                "--reuse) cannot run this vector set; run it without them"
            )


def _reuse_lengths(args: argparse.Namespace, manifest: dict, vectors: dict) -> list[int]:
    """``--reuse N,N,...``, or by default the positions ``reuse_positions`` picks from the prompt lengths."""
    from dsv4.engine.vectors import reuse_positions

    if args.reuse != "auto":
        try:
            lengths = [int(n) for n in args.reuse.split(",")]
        except ValueError:
            raise ValueError(f"--reuse takes comma-separated token counts, got {args.reuse!r}") from None
        if min(lengths) < 1:
            raise ValueError(f"--reuse lengths must be >= 1, got {args.reuse!r}")
        return lengths
    config = open_checkpoint_config(Path(args.dir) / manifest["checkpoint"]["dir"])
    lengths = [len(vectors[f"prompt{i}.input_ids"]) for i in range(len(manifest["prompts"]))]
    return reuse_positions(lengths, config.window_size)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-vectors", help="check the model against a reference-vector set")
    p.add_argument("dir", help="vector set directory (manifest.json, vectors.safetensors, kernels.safetensors, ckpt/)")
    p.add_argument("--mode", action="append", help="numerics mode to check (repeatable; default: every mode)")
    p.add_argument("--chunk", type=int, help="run through the engine, prefilling in chunks of N tokens")
    p.add_argument("--batch", action="store_true", help="run through the engine, all prompts in one ragged batch")
    p.add_argument(
        "--reuse",
        nargs="?",
        const="auto",
        metavar="N,N,...",
        help="run through the engine as two requests per prompt - its first N tokens, then the whole prompt, "
        "which restores them from the prefix cache - for each N (default: inside a compression window, at a "
        "block boundary and inside the sliding window)",
    )
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel-level vectors")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N")
    p.add_argument("--tp", type=int, default=1, help="through the engine, the model split over N processes")
    p.set_defaults(func=run)
