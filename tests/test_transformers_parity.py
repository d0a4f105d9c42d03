"""dsv4 against Hugging Face transformers' ``DeepseekV4ForCausalLM``, an implementation written independently
of ours: the same random official-format checkpoint is loaded by both, and the logits must agree in fp32.

dsv4 runs in ``fp32_nosim`` (fp32 everywhere, no FP8/FP4 activation or KV rounding), which is exactly what
transformers computes in fp32 with its FP8 weights dequantised on load (architecture.md §14.2 item 1: it
simulates no quantisation; items 2-7 are bf16 rounding places that vanish in fp32). What is compared:

* the full forward of a prompt that crosses the 128-token window and three 128-token HCA windows, at every
  position;
* dsv4's cached path - a prefill, token-by-token decodes and multi-token continuations whose cuts fall
  before, on and across window, CSA (4) and HCA (128) boundaries - against transformers' full forward at the
  same positions, and against transformers' own incremental decode (DynamicCache) with the same cuts;
* a negative control: the comparison must see the compressors' position biases (``ape``), the subtlest
  randomised parameter, which only acts through compressed entries.

Tolerance: max abs 1e-4 on logits of std ~2.5. The reference-vector authors measured ~3e-5 of fp32 noise
between transformers and the official fp32 code (different GEMM shapes and summation orders), while any
semantic error they planted (a dropped sink, ape, mHC term, a wrong RoPE position, an off-by-one window)
moved logits by >= 2.8 - four orders of magnitude separate the two.

Workarounds for known transformers deviations (architecture.md §14.2):
* item 10: without ``compress_ratios`` transformers invents its own layer kinds - dsv4's ``to_hf`` always
  writes ``compress_ratios``, and each test asserts the layer kinds transformers built;
* transformers mis-dequantises FP8 weights whose dimensions are not multiples of 128, so every linear
  dimension here is a multiple of 128 (dsv4's config validation demands most of them anyway);
* item 9: transformers has no MTP; its ``mtp.*`` keys are ignored, and the test checks nothing else is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to dequantise FP8 checkpoints on load

from transformers import DeepseekV4ForCausalLM, DynamicCache, FineGrainedFP8Config  # noqa: E402

from dsv4.cache.contiguous import ContiguousCache  # noqa: E402
from dsv4.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from dsv4.config import ModelConfig  # noqa: E402
from dsv4.model.batch import Span  # noqa: E402
from dsv4.model.transformer import Transformer  # noqa: E402
from dsv4.tiny import random_state, tiny_config  # noqa: E402

TOL = 1e-4  # see the module docstring: fp32 noise ~3e-5, semantic errors >= 2.8

# Prompt length: crosses the window (128) and closes HCA windows at positions 127, 255 and 383.
LENGTH = 390

# Cached schedule [(start, end), ...] covering 0..LENGTH. Chosen so that:
# - the prefill (122) ends mid CSA window and before the sliding window is full;
# - single-token decodes 122..130 fill the window (127 -> 128 keys, then it slides), close CSA windows at 123
#   and 127 and the first HCA window at 127, all from the decode path;
# - 130..249 is a continuation starting and ending mid CSA window (130 % 4 == 2, 119 tokens);
# - decodes 249..258 close the second HCA window (255) and CSA windows 251 and 255 one token at a time;
# - 258..384 is a continuation that ends exactly on the third HCA boundary (383 is its last token);
# - decodes 384..390 run right after a window that closed at the end of a chunk.
SCHEDULE: list[tuple[int, int]] = (
    [(0, 122)]
    + [(p, p + 1) for p in range(122, 130)]
    + [(130, 249)]
    + [(p, p + 1) for p in range(249, 258)]
    + [(258, 384)]
    + [(p, p + 1) for p in range(384, LENGTH)]
)

_HF_KIND = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


def _configs() -> dict[str, tuple[ModelConfig, int]]:
    """Name -> (config, seed). Both have >= 16 indexer heads and index_topk well below the number of CSA
    entries at the end of the prompt (LENGTH // 4 = 97), so the indexer's top-k really selects."""
    return {
        # The reference-model shape: window / CSA / HCA / window / CSA, 8 heads of 256, 2 output groups,
        # 16 indexer heads, top-32, hash routing on the first two layers, YaRN with original length 256.
        "default": (tiny_config(), 0),
        # A different kinds order (HCA first, then CSA directly after), more and narrower heads, four output
        # groups, 32 indexer heads with top-16, hash routing on the HCA and the first CSA layer, more experts
        # with more of them active, a different route scale and YaRN setting, and another seed.
        "hca_first": (
            tiny_config(
                n_layers=4,
                compress_ratios=(128, 4, 0, 4, 0),  # + the MTP block (window-only)
                n_hash_layers=2,
                n_heads=16,
                head_dim=128,
                o_groups=4,
                index_n_heads=32,
                index_topk=16,
                n_routed_experts=16,
                n_activated_experts=3,
                route_scale=2.5,
                original_seq_len=128,
                rope_factor=8.0,
                max_position_embeddings=1024,  # = 128 * 8; transformers warns when YaRN's factor disagrees
            ),
            7,
        ),
    }


CONFIGS = _configs()


@dataclass
class Pair:
    name: str
    config: ModelConfig
    dsv4: Transformer
    hf: DeepseekV4ForCausalLM
    tokens: torch.Tensor  # [LENGTH] int64
    hf_full: torch.Tensor  # [LENGTH, vocab] transformers' full-forward logits


def _load_hf(path: Path) -> DeepseekV4ForCausalLM:
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        quantization_config=FineGrainedFP8Config(dequantize=True),
        output_loading_info=True,
    )
    # A weight transformers did not load would stay at its random init and the comparison would fail
    # obscurely; an unused one would mean a naming mismatch hiding a parameter from one side.
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    config, seed = CONFIGS[request.param]
    assert config.index_n_heads >= 16 and config.index_topk < LENGTH // 4
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    # save_checkpoint(random_state(...)) rather than tiny.write_random_checkpoint: the model directory is all
    # both loaders need (no tokenizer); two shards so that transformers reads through the shard index.
    save_checkpoint(random_state(config, seed), config, path, n_shards=2)

    model = Transformer(config, "fp32_nosim")
    load_checkpoint(model.state_dict(), path, progress=False)
    hf = _load_hf(path)
    kinds = [_HF_KIND[r] for r in config.compress_ratios[: config.n_layers]]
    assert list(hf.config.layer_types) == kinds  # §14.2 item 10: transformers builds the layers we wrote

    tokens = torch.randint(0, config.vocab_size, (LENGTH,), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        hf_full = hf(tokens[None], use_cache=False).logits[0].float()
    return Pair(request.param, config, model, hf, tokens, hf_full)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item()


def test_full_forward(pair: Pair) -> None:
    """One prefill of the whole prompt, logits at every position."""
    model, n = pair.dsv4, LENGTH
    cache = ContiguousCache(model.n_cache_layers, pair.config.window_size, torch.float32)
    logits = model(pair.tokens, [Span(0, n, 0, cache)], logit_rows=torch.arange(n)).logits
    assert _max_diff(logits, pair.hf_full) <= TOL


def test_cached_decode(pair: Pair) -> None:
    """dsv4's prefill + decode + continuations vs transformers' full forward and its own DynamicCache run."""
    model, hf, tokens = pair.dsv4, pair.hf, pair.tokens
    cache = ContiguousCache(model.n_cache_layers, pair.config.window_size, torch.float32)
    hf_cache = DynamicCache(config=hf.config)
    ours, theirs = [], []
    with torch.no_grad():
        for start, end in SCHEDULE:
            n = end - start
            chunk = tokens[start:end]
            ours.append(model(chunk, [Span(0, n, start, cache)], logit_rows=torch.arange(n)).logits)
            theirs.append(hf(chunk[None], cache=hf_cache, use_cache=True).logits[0].float())
    ours_all, theirs_all = torch.cat(ours), torch.cat(theirs)
    # Against the full forward: the cached path must compute the same function of the prefix.
    assert _max_diff(ours_all, pair.hf_full) <= TOL
    # Against transformers' cached path with the same cuts: both caches carry the same state across calls
    # (window tail, CSA overlap halves, partial compression windows).
    assert _max_diff(ours_all, theirs_all) <= TOL


def test_negative_control_ape(pair: Pair) -> None:
    """The comparison is sharp: zeroing transformers' compressor position biases (``ape``) moves its
    logits far outside the tolerance, so a dsv4 that ignored ``ape`` could not pass the tests above."""
    biases = [p for name, p in pair.hf.named_parameters() if name.endswith("position_bias")]
    assert biases
    saved = [p.detach().clone() for p in biases]
    try:
        with torch.no_grad():
            for p in biases:
                p.zero_()
            perturbed = pair.hf(pair.tokens[None], use_cache=False).logits[0].float()
    finally:
        with torch.no_grad():
            for p, s in zip(biases, saved, strict=True):
                p.copy_(s)
    # Positions 0..2 precede the first compressed entry (CSA, closed at 3), so ape cannot reach them yet.
    assert _max_diff(perturbed[:3], pair.hf_full[:3]) <= TOL
    assert _max_diff(perturbed[3:], pair.hf_full[3:]) > 1000 * TOL
