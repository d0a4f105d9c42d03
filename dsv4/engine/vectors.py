"""The reference vectors run through the whole engine - scheduler, paged pool, runner - instead of the bare
model, so that chunked prefill, ragged batching, the pool's storage and the prefix cache are held to the
same tolerances as the model maths (``dsv4 check-vectors --chunk N`` / ``--batch`` / ``--reuse``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dsv4.cache import layout
from dsv4.engine.llm import LLM
from dsv4.engine.sampling import SamplingParams

# Block size of the reuse runs: the smallest allowed, so that short vector prompts still cross a boundary.
REUSE_BLOCK_TOKENS = 128


def reuse_positions(prompt_lengths: list[int], window_size: int) -> list[int]:
    """Where ``--reuse`` cuts by default, from the shortest prompt: inside a compression window (2 tokens into
    a 4-token window, half-way), at a block boundary, and inside the sliding window of the prompt's end."""
    shortest = min(prompt_lengths)
    positions = {4 * (shortest // 8) + 2, REUSE_BLOCK_TOKENS * ((shortest - 1) // REUSE_BLOCK_TOKENS)}
    positions.add(shortest - min(37, window_size // 2))
    return sorted(n for n in positions if 0 < n < shortest)


def run_vectors_through_engine(
    vector_dir: str | Path,
    mode: str,
    chunk: int | None = None,
    batch: bool = False,
    reuse: int | None = None,
    device: str | torch.device = "cpu",
    tp: int = 1,
) -> dict[int, torch.Tensor]:
    """Logits [1 + decode tokens, vocab] per prompt index: row 0 at the last prompt position, row j after
    the teacher-forced decode token j-1.

    All prompts run concurrently. With ``chunk`` each one is prefilled ``chunk`` tokens per step; with
    ``batch`` every prompt is prefilled whole in one ragged step. With ``reuse`` each prompt runs as two
    requests, as an agent's turns do: its first ``reuse`` tokens, then the whole prompt, which must restore
    those tokens from the prefix cache and compute only the rest. Then the ``decode_ids`` are fed one per
    step in place of sampled tokens. ``tp`` splits the model over that many processes.
    """
    if sum((chunk is not None, batch, reuse is not None)) != 1 or (chunk or 1) < 1 or (reuse or 1) < 1:
        raise ValueError("pass either a positive chunk size, batch=True or a positive reuse length")
    vector_dir = Path(vector_dir)
    manifest = json.loads((vector_dir / "manifest.json").read_text())
    vectors = load_file(vector_dir / "vectors.safetensors")
    n = len(manifest["prompts"])
    prompts = [vectors[f"prompt{i}.input_ids"].tolist() for i in range(n)]
    decodes = [vectors[f"prompt{i}.decode_ids"].tolist() for i in range(n)]
    longest = max(len(p) + len(d) for p, d in zip(prompts, decodes, strict=True))
    chunk_size = chunk if chunk is not None else max(len(p) for p in prompts)
    block_tokens = REUSE_BLOCK_TOKENS if reuse is not None else layout.DEFAULT_BLOCK_TOKENS
    with LLM(
        vector_dir / manifest["checkpoint"]["dir"],
        mode,
        max_num_seqs=n,
        num_blocks=2 * n * layout.blocks_for(longest + 1, block_tokens),
        block_tokens=block_tokens,
        chunk_size=chunk_size,
        max_num_batched_tokens=n * chunk_size,
        progress=False,
        device=device,
        tp=tp,
    ) as llm:
        return _run(llm, prompts, decodes, reuse)


def _run(llm: LLM, prompts: list[list[int]], decodes: list[list[int]], reuse: int | None) -> dict[int, torch.Tensor]:
    cut = [min(reuse, len(p) - 1) for p in prompts] if reuse is not None else []
    if reuse is not None:
        for prompt, n_first in zip(prompts, cut, strict=True):
            llm.add_request(prompt[:n_first], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        while llm.has_unfinished:
            llm.step()
    ids = []
    for prompt, decode in zip(prompts, decodes, strict=True):
        # greedy and ignore_eos: the forced tokens alone decide what is fed, and nothing stops it early
        params = SamplingParams(temperature=0.0, max_tokens=len(decode) + 1, ignore_eos=True)
        ids.append(llm.add_request(prompt, params, forced_token_ids=decode, capture_logits=True))
    outputs: dict[str, torch.Tensor] = {}
    while llm.has_unfinished:
        for out in llm.step():
            if out.finished:
                assert out.logits is not None
                outputs[out.request_id] = out.logits.cpu()
                i = ids.index(out.request_id)
                if reuse is not None and out.num_cached_tokens != cut[i]:
                    raise RuntimeError(
                        f"prompt {i}: the prefix cache restored {out.num_cached_tokens} tokens, not {cut[i]}"
                    )
    return {i: outputs[request_id] for i, request_id in enumerate(ids)}
