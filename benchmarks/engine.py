"""dsv4's engine against transformers' ``DeepseekV4ForCausalLM`` on the same small fp32 checkpoint.

Per context length: prefill tokens/s (one prompt of that length), batch-1 decode tokens/s right after it,
and - dsv4 only - aggregate decode tokens/s with ``--concurrency`` sequences at that context. The
concurrent sequences are copies of the prefilled one, each with its own copy of every cache block, so
measuring them costs one prefill rather than sixteen while their decode steps do what independent prompts'
would: read as many distinct bytes, from as many places in the pool.

    python benchmarks/engine.py --contexts 2048,8192 --decode-tokens 32

The model is a random checkpoint of a named config (``--config``): ``small`` (default: dim 1024, 16 heads
of 512, 5 layers window/CSA/HCA/window/CSA, 8 experts top-2 - small enough for a 2-core CPU, large enough
that its time goes into the layers rather than Python overhead) or ``tiny`` (the reference vectors' size).
In ``small`` the attention (its projections, the indexer and the sparse core) takes most of a decode step,
which makes it the config for the long-context check: the step at 128K against the step at 8K.

transformers runs contexts up to ``--hf-max-context`` and prefills in chunks of ``--hf-chunk`` through its
own cache: its attention materialises dense [queries x context] scores, which for a one-shot 32K prefill
would need tens of GB. Both engines compute in fp32 without quantisation simulation, which is what
transformers computes.

``--peer llama.cpp`` adds llama.cpp (through ``llama-cpp-python``, the ``llamacpp`` extra) at the same
contexts in the same process run: the checkpoint is converted to a GGUF F32 file with the converter of the
llama.cpp that llama-cpp-python vendors (``--llama-convert``: its ``convert_hf_to_gguf.py``, with the
``gguf-py`` beside it; the wheel does not ship it), then run in its exact config (F32 KV cache, flash
attention off - the only one that matches the reference within tolerance) and in its defaults (F16 KV, flash
attention on). The converter does not know the random checkpoint's byte-level test tokenizer, so it is told
to treat it as DeepSeek-V3's pre-tokenizer; the benchmark feeds token ids, so the vocabulary's text plays no
part. ``--profile`` prints where a batch-1 decode step's time goes (torch.profiler) instead. ``--numerics
bf16_official`` (or ``fp32_sim``) measures dsv4 alone in a serving mode, its index keys and cache entries
stored compactly (FP4, FP8).
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dsv4 import LLM, SamplingParams
from dsv4.cache import layout
from dsv4.engine.sampler import SampledToken
from dsv4.engine.sequence import Sequence, SequenceStatus
from dsv4.tiny import tiny_config, write_random_checkpoint

CONFIGS = {
    "tiny": {},
    "small": {
        "dim": 1024,
        "n_heads": 16,
        "head_dim": 512,
        "q_lora_rank": 512,
        "o_groups": 4,
        "o_lora_rank": 512,
        "moe_inter_dim": 512,
    },
}


def _step_until(llm: LLM, done) -> float:
    start = time.perf_counter()
    while not done():
        llm.step()
    return time.perf_counter() - start


def _fork(llm: LLM, seq: Sequence, n: int) -> list[Sequence]:
    """``n`` running copies of ``seq`` at its current state, each with its own copy of its cache blocks."""
    assert llm.pool is not None and llm.scheduler is not None and seq.cache is not None
    copies = []
    for i in range(n):
        copy = Sequence(f"{seq.request_id}.{i}", seq.prompt_ids, seq.params, llm.eos_token_ids, llm.max_model_len)
        for token in seq.output_ids:
            copy.append(SampledToken(token, None, []), None)
        copy.cache, copy.num_computed = llm.pool.fork(seq.cache, share_blocks=False), seq.num_computed
        copy.status = SequenceStatus.RUNNING
        llm.scheduler.running.append(copy)
        llm._requests[copy.request_id] = copy
        copies.append(copy)
    return copies


def bench_dsv4(
    path: Path, context: int, decode: int, concurrency: int, chunk_size: int, numerics: str
) -> dict[str, float]:
    blocks = concurrency * layout.blocks_for(context + 2 * decode + 1)
    llm = LLM(path, numerics, max_num_seqs=concurrency, num_blocks=blocks, chunk_size=chunk_size, progress=False)
    prompt = torch.randint(2, llm.config.vocab_size, (context,), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.0, max_tokens=2 * decode + 1, ignore_eos=True)
    seq = llm._requests[llm.add_request(prompt.tolist(), params)]
    prefill = _step_until(llm, lambda: len(seq.output_ids) >= 1)
    single = _step_until(llm, lambda: len(seq.output_ids) >= 1 + decode)
    others = _fork(llm, seq, concurrency - 1)
    together = _step_until(llm, lambda: not llm.has_unfinished)
    assert all(len(s.output_ids) == 2 * decode + 1 for s in [seq, *others])
    return {
        "prefill": context / prefill,
        "decode": decode / single,
        "aggregate": concurrency * decode / together,
    }


def bench_hf(path: Path, context: int, decode: int, chunk: int) -> dict[str, float]:
    """transformers' prefill (in chunks of ``chunk`` through its own cache, so that its dense attention
    scores stay [chunk x context] rather than [context x context]) and its batch-1 decode."""
    from transformers import DeepseekV4ForCausalLM, DynamicCache, FineGrainedFP8Config

    model = DeepseekV4ForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True)
    ).eval()
    vocab = model.config.vocab_size
    prompt = torch.randint(2, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        for lo in range(0, context, chunk):
            out = model(input_ids=prompt[:, lo : lo + chunk], cache=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode):
            out = model(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        single = time.perf_counter() - start
    return {"prefill": context / prefill, "decode": decode / single}


def convert_to_gguf(path: Path, converter: Path, out: Path) -> Path:
    """``path`` converted to a GGUF F32 file by llama.cpp's own converter, in a child process (it imports
    its vendored ``gguf`` and ``conversion`` packages, which must not shadow anything in this one)."""
    root = converter.resolve().parent
    shim = (
        "import runpy, sys\n"
        f"sys.path[:0] = [{str(root)!r}, {str(root / 'gguf-py')!r}]\n"
        "import conversion.base as base\n"
        # the random checkpoint's test tokenizer is not one the converter recognises by hash
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'deepseek-v3'\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {str(path)!r}, '--outtype', 'f32', '--outfile', {str(out)!r}]\n"
        f"runpy.run_path({str(converter)!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", shim], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
    return out


LLAMA_CONFIGS = {"llama.cpp exact": (0, False), "llama.cpp default": (1, True)}  # (KV ggml type, flash attn)


def bench_llama_cpp(gguf: Path, context: int, decode: int, threads: int, kv_type: int, flash: bool) -> dict[str, float]:
    """llama.cpp's prefill of the same prompt (2048-token batches, 512-token micro-batches, as its own
    batched-bench) and its batch-1 greedy decode right after it, on ``threads`` threads."""
    import llama_cpp.llama_cpp as binding
    import numpy as np
    from llama_cpp import Llama

    # On this AMX CPU a native build puts weights in ggml's AMX/repack buffer types, whose backend supports
    # none of the ops V4's graph runs on them (graph reserve aborts: GGML_ASSERT(*cur_backend_id != -1));
    # llama.cpp's tools turn them off with --no-repack, the Python binding only through the model params.
    defaults = binding.llama_model_default_params

    def model_params() -> binding.llama_model_params:
        params = defaults()
        params.use_extra_bufts = False
        return params

    binding.llama_model_default_params = model_params
    llm = Llama(
        model_path=str(gguf),
        n_ctx=context + decode + 16,
        n_batch=2048,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash,
        type_k=kv_type,
        type_v=kv_type,
        verbose=False,
    )
    prompt = torch.randint(2, llm.n_vocab(), (context,), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        llm.eval([int(logits.argmax())])
    single = time.perf_counter() - start
    llm.close()
    binding.llama_model_default_params = defaults
    return {"prefill": context / prefill, "decode": decode / single}


def _record(owner: object, name: str, label: str) -> None:
    """Wrap ``owner.name`` in a profiler range called ``label``."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def recorded(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    setattr(owner, name, recorded)


def _label_regions() -> None:
    """Name the parts of a decode step for the profiler (this process only; the model is not changed)."""
    from dsv4.model import attention, compressor, hyper, indexer, moe, norm, rope, transformer
    from dsv4.numerics import gemm

    _record(gemm, "_run_kernel", "GEMM kernels (FP8/FP4/bf16 weights)")
    for fn in ("hc_pre", "hc_post", "hc_head"):
        _record(transformer, fn, f"mHC {fn}")
    _record(hyper, "_normalize", "mHC Sinkhorn iterations")
    _record(norm.RMSNorm, "forward", "RMSNorm")
    _record(attention, "head_rms_normalize", "query head RMS norm")
    _record(rope.Rotary, "rotate", "RoPE")
    _record(attention.Attention, "forward", "attention (all of it)")
    _record(attention.Attention, "_gather_decode", "attention: cache reads and writes")
    _record(attention, "sparse_attention_on_keys", "attention: sparse core")
    _record(attention, "attend_gathered", "attention: sparse core")
    _record(indexer.Indexer, "select_group", "indexer top-k")
    _record(compressor.Compressor, "pool_group", "compressor pooling")
    _record(moe.MoE, "forward", "MoE (all of it)")
    _record(transformer.Transformer, "forward", "model forward")


def profile_decode(path: Path, context: int, decode: int) -> None:
    """Prefill one ``context``-token prompt, then profile ``decode`` batch-1 steps: per labelled region its
    inclusive time and calls per step, and the number of aten ops a step dispatches."""
    llm = LLM(
        path, "fp32_nosim", max_num_seqs=1, num_blocks=layout.blocks_for(context + 3 * decode + 1), progress=False
    )
    prompt = torch.randint(2, llm.config.vocab_size, (context,), generator=torch.Generator().manual_seed(0))
    seq = llm._requests[llm.add_request(prompt.tolist(), SamplingParams(max_tokens=3 * decode + 1, ignore_eos=True))]
    _step_until(llm, lambda: len(seq.output_ids) >= 1 + decode)  # warm-up, compiles included
    start = time.perf_counter()
    _step_until(llm, lambda: len(seq.output_ids) >= 1 + 2 * decode)
    plain = (time.perf_counter() - start) / decode
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _step_until(llm, lambda: len(seq.output_ids) >= 1 + 3 * decode)
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"\ncontext {context}: decode step {1000 * plain:.1f} ms unprofiled, {ops / decode:.0f} aten ops per step")
    print("| region | ms per step (profiled, inclusive) | calls per step |\n|---|---|---|")
    for e in sorted(events, key=lambda e: -e.cpu_time_total):
        if not e.key.startswith(("aten::", "ProfilerStep", "detach")):
            print(f"| {e.key} | {e.cpu_time_total / 1000 / decode:.2f} | {e.count / decode:.0f} |")
    print("top aten ops by self time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        if e.key.startswith("aten::"):
            print(f"  {e.key}: {e.self_cpu_time_total / 1000 / decode:.2f} ms, {e.count / decode:.0f} calls per step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="2048,8192,32768,131072", help="comma-separated prompt lengths")
    parser.add_argument("--hf-max-context", type=int, default=32768, help="longest context run with transformers")
    parser.add_argument("--hf-chunk", type=int, default=4096, help="transformers' prefill chunk")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=512, help="dsv4 prefill chunk")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--model", type=Path, help="an fp32-servable checkpoint (default: a random --config one)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small", help="random checkpoint's config")
    parser.add_argument(
        "--peer",
        action="append",
        choices=["transformers", "llama.cpp"],
        help="peers to run (repeatable; default transformers)",
    )
    parser.add_argument(
        "--llama-convert",
        type=Path,
        default=os.environ.get("LLAMA_CPP_CONVERT"),
        help="llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERT)",
    )
    parser.add_argument("--profile", action="store_true", help="profile batch-1 decode steps at each context")
    parser.add_argument(
        "--numerics",
        default="fp32_nosim",
        help="dsv4's numerics mode; the peers compute fp32 without simulation, so other modes run dsv4 alone",
    )
    args = parser.parse_args()
    peers = args.peer or ["transformers"]
    if args.numerics != "fp32_nosim":
        peers = []
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:  # the tiny model's dims are multiples of 128, as transformers' FP8 loader needs
            config = tiny_config(**CONFIGS[args.config], max_position_embeddings=max(contexts) * 2)
            path = write_random_checkpoint(Path(tmp) / "ckpt", config)
        print(
            f"config: {args.model or args.config}, torch threads: {torch.get_num_threads()}, decode tokens: "
            f"{args.decode_tokens}, concurrency: {args.concurrency}, dsv4 chunk: {args.chunk_size}, dsv4 numerics: "
            f"{args.numerics}"
        )
        if args.profile:
            _label_regions()
            for context in contexts:
                profile_decode(path, context, args.decode_tokens)
            return
        gguf = None
        if "llama.cpp" in peers:
            if args.llama_convert is None:
                parser.error("--peer llama.cpp needs --llama-convert (llama.cpp's convert_hf_to_gguf.py)")
            gguf = convert_to_gguf(path, args.llama_convert, Path(tmp) / "model-f32.gguf")
        steps: dict[int, float] = {}
        header = f"{'context':>8} | {'engine':<22} | {'prefill tok/s':>13} | {'decode tok/s':>12} | {'aggregate':>9}"
        print(header + "\n" + "-" * len(header))
        for context in contexts:
            ours = bench_dsv4(path, context, args.decode_tokens, args.concurrency, args.chunk_size, args.numerics)
            steps[context] = 1000 / ours["decode"]
            print(
                f"{context:>8} | {'dsv4':<22} | {ours['prefill']:>13.1f} | {ours['decode']:>12.2f} | "
                f"{ours['aggregate']:>9.2f}   (aggregate {ours['aggregate'] / ours['decode']:.2f}x batch-1, "
                f"decode step {steps[context]:.1f} ms)",
                flush=True,
            )
            runs: dict[str, Callable[[], dict[str, float]]] = {}
            if "transformers" in peers and context <= args.hf_max_context:
                runs["transformers"] = functools.partial(bench_hf, path, context, args.decode_tokens, args.hf_chunk)
            if gguf is not None:
                for name, (kv_type, flash) in LLAMA_CONFIGS.items():
                    runs[name] = functools.partial(
                        bench_llama_cpp, gguf, context, args.decode_tokens, torch.get_num_threads(), kv_type, flash
                    )
            for name, run in runs.items():
                theirs = run()
                print(
                    f"{context:>8} | {name:<22} | {theirs['prefill']:>13.1f} | {theirs['decode']:>12.2f} | "
                    f"{'-':>9}   (decode step {1000 / theirs['decode']:.1f} ms)"
                )
                print(
                    f"{context:>8} | {'dsv4 / ' + name:<22} | {ours['prefill'] / theirs['prefill']:>12.2f}x | "
                    f"{ours['decode'] / theirs['decode']:>11.2f}x | "
                    f"{ours['aggregate'] / theirs['decode']:>8.2f}x",
                    flush=True,
                )
        for long in sorted(steps):
            for short in sorted(steps):
                if short < long and short >= 8192:
                    print(f"decode step at {long} / at {short}: {steps[long] / steps[short]:.2f}x")


if __name__ == "__main__":
    main()
