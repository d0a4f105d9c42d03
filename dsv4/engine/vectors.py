"""The reference vectors run through the whole engine - scheduler, paged pool, runner - instead of the bare
model, so that chunked prefill, ragged batching and the pool's storage are held to the same tolerances as
the model maths (``dsv4 check-vectors --chunk N`` / ``--batch``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dsv4.cache import layout
from dsv4.engine.llm import LLM
from dsv4.engine.sampling import SamplingParams


def run_vectors_through_engine(
    vector_dir: str | Path, mode: str, chunk: int | None = None, batch: bool = False
) -> dict[int, torch.Tensor]:
    """Logits [1 + decode tokens, vocab] per prompt index: row 0 at the last prompt position, row j after
    the teacher-forced decode token j-1.

    All prompts run concurrently. With ``chunk`` each one is prefilled ``chunk`` tokens per step; with
    ``batch`` every prompt is prefilled whole in one ragged step. Then the ``decode_ids`` are fed one per
    step in place of sampled tokens.
    """
    if (chunk is None) == (not batch) or (chunk is not None and chunk < 1):
        raise ValueError("pass either a positive chunk size or batch=True")
    vector_dir = Path(vector_dir)
    manifest = json.loads((vector_dir / "manifest.json").read_text())
    vectors = load_file(vector_dir / "vectors.safetensors")
    n = len(manifest["prompts"])
    prompts = [vectors[f"prompt{i}.input_ids"].tolist() for i in range(n)]
    decodes = [vectors[f"prompt{i}.decode_ids"].tolist() for i in range(n)]
    longest = max(len(p) + len(d) for p, d in zip(prompts, decodes, strict=True))
    chunk_size = chunk if chunk is not None else max(len(p) for p in prompts)
    llm = LLM(
        vector_dir / manifest["checkpoint"]["dir"],
        mode,
        max_num_seqs=n,
        num_blocks=n * layout.blocks_for(longest + 1),
        chunk_size=chunk_size,
        max_num_batched_tokens=n * chunk_size,
        progress=False,
    )
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
                outputs[out.request_id] = out.logits
    return {i: outputs[request_id] for i, request_id in enumerate(ids)}
