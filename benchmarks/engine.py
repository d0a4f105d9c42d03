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
"""

from __future__ import annotations

import argparse
import tempfile
import time
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


def bench_dsv4(path: Path, context: int, decode: int, concurrency: int, chunk_size: int) -> dict[str, float]:
    blocks = concurrency * layout.blocks_for(context + 2 * decode + 1)
    llm = LLM(path, "fp32_nosim", max_num_seqs=concurrency, num_blocks=blocks, chunk_size=chunk_size, progress=False)
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
    args = parser.parse_args()
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
            f"{args.decode_tokens}, concurrency: {args.concurrency}, dsv4 chunk: {args.chunk_size}"
        )
        steps: dict[int, float] = {}
        header = f"{'context':>8} | {'engine':<12} | {'prefill tok/s':>13} | {'decode tok/s':>12} | {'aggregate':>9}"
        print(header + "\n" + "-" * len(header))
        for context in contexts:
            ours = bench_dsv4(path, context, args.decode_tokens, args.concurrency, args.chunk_size)
            steps[context] = 1000 / ours["decode"]
            print(
                f"{context:>8} | {'dsv4':<12} | {ours['prefill']:>13.1f} | {ours['decode']:>12.2f} | "
                f"{ours['aggregate']:>9.2f}   (aggregate {ours['aggregate'] / ours['decode']:.2f}x batch-1, "
                f"decode step {steps[context]:.1f} ms)",
                flush=True,
            )
            if context > args.hf_max_context:
                continue
            theirs = bench_hf(path, context, args.decode_tokens, args.hf_chunk)
            print(
                f"{context:>8} | {'transformers':<12} | {theirs['prefill']:>13.1f} | {theirs['decode']:>12.2f} | "
                f"{'-':>9}"
            )
            print(
                f"{context:>8} | {'ratio':<12} | {ours['prefill'] / theirs['prefill']:>12.2f}x | "
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
