"""The calculator's figures are what the engine really allocates: run the model through the paged pool at
several context lengths and compare the pool's bytes with ``dsv4 costs --json`` for the same model."""

from __future__ import annotations

import json

import pytest
import torch

from dsv4.cache.pool import KVPool
from dsv4.cli import main
from dsv4.model.batch import Span
from dsv4.model.loading import load_model

CONTEXTS = (1, 130, 256, 257, 600)


def _costs(model_dir, context: int, capsys) -> dict:
    assert main(["costs", "--model", str(model_dir), "--context", str(context), "--json"]) == 0
    (figures,) = json.loads(capsys.readouterr().out)["models"].values()
    return figures["storage"]


@pytest.mark.parametrize("mode", ["bf16_official", "fp32_nosim"])
def test_pool_bytes_equal_the_calculator(reference_dir, mode, capsys):
    ckpt = reference_dir / "ckpt"
    model = load_model(ckpt, mode, progress=False)
    g = torch.Generator().manual_seed(0)
    for context in CONTEXTS:
        pool = KVPool(model.config, mode, num_blocks=4, block_tokens=256, max_sequences=2)
        seq = pool.new_sequence()
        pool.reserve(seq, context)
        tokens = torch.randint(2, model.config.vocab_size, (context,), generator=g)
        model(tokens, [Span(0, context, 0, seq)])
        storage = _costs(ckpt, context, capsys)[mode]
        assert pool.used_bytes == storage["sequence_bytes_at_context"], context
        assert pool.bytes_per_token().total == pytest.approx(storage["kv_bytes_per_token"], abs=0)
        pool.free(seq)
        assert pool.used_bytes == 0


@pytest.mark.parametrize("mode", ["bf16_official", "fp32_nosim"])
def test_a_checkpoint_costs_what_the_calculator_says(reference_dir, mode, capsys):
    """A 300-token prompt leaves one prefix-cache checkpoint: its state slot and its copy of the partial
    second block (``checkpoint_bytes``), plus the first block, which no running sequence holds any more."""
    from dsv4 import LLM, SamplingParams

    ckpt = reference_dir / "ckpt"
    llm = LLM(ckpt, mode, max_num_seqs=1, num_blocks=8, block_tokens=256, progress=False)
    llm.generate([list(range(2, 302))], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    storage = _costs(ckpt, 300, capsys)[mode]
    stats = llm.prefix_stats()
    assert stats.checkpoints == 1
    assert stats.cached_bytes == storage["checkpoint_bytes"] + storage["block_bytes"]
