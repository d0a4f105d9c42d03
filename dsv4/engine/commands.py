"""``dsv4 generate``: complete one prompt with the engine and stream the text to stdout."""

from __future__ import annotations

import argparse
import sys

from dsv4.engine.sampling import SamplingParams


def _generate(args: argparse.Namespace) -> int:
    from dsv4.engine.llm import LLM  # torch and the model load only when the command runs
    from dsv4.engine.tensor_parallel import default_tp, serve_if_worker

    if serve_if_worker(args.device):
        return 0

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens)
    params.validate()
    prompt = args.prompt
    if args.chat:
        from dsv4.chat.encoding import encode_messages

        prompt = encode_messages([{"role": "user", "content": prompt}], thinking_mode="chat")
    tp = args.tp or default_tp()
    with LLM(args.model, args.numerics, max_num_seqs=1, progress=not args.quiet, device=args.device, tp=tp) as llm:
        if llm.model is not None and llm.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer.json: dsv4 generate needs one to encode the prompt")
        finish = None
        for out in llm.stream(prompt, params):
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
            finish = out.finish_reason
    sys.stdout.write("\n")
    if not args.quiet:
        print(f"[finish: {finish}]", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt with a checkpoint (streams the text)")
    p.add_argument("--model", required=True, help="checkpoint directory (or a preset name: shapes only)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="make the sampling reproducible")
    p.add_argument("--numerics", default=None, help="bf16_official, fp32_sim or fp32_nosim")
    p.add_argument("--device", default="cpu", help="where the model, its cache and sampling run: cpu, cuda, cuda:N")
    p.add_argument("--tp", type=int, default=None, help="split the model over N processes (default: torchrun's, or 1)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user message of a chat")
    p.add_argument("--quiet", action="store_true", help="no progress bars or finish line on stderr")
    p.set_defaults(func=_generate)
