"""Sparse attention with an attention sink, emulating the official TileLang ``sparse_attn`` kernel (§3.5).

The kernel's online softmax over blocks of 64 indices rounds differently from a one-pass softmax (the
running max rescales partial sums, and the probabilities are cast to bf16 before P·V), and in the
simulated numerics modes those roundings feed later FP8 roundings. So this follows the kernel's block
order and casts rather than calling a fused softmax. Checked bit-exact against the reference vectors with:
natural ``exp`` (not exp2 with log2(e) folded into the scale), the denominator summing the fp32
probabilities (summing the bf16-cast ones is 2 ulps off), and a final division by the denominator.
"""

from __future__ import annotations

import torch

BLOCK = 64
# Queries per pass: each pass gathers the keys of its whole lists at once ([queries, slots, D]), so a long
# prefill is cut into passes that keep that gather around 32 MB in fp32 (queries are independent; the result
# does not depend on it).
QUERY_CHUNK_ELEMENTS = 1 << 23


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attend each query to the KV rows its index list names, with one sink logit per head.

    q [T, H, D]; kv [N, D] (one shared head, used as key and value); idx [T, K] integer row indices with
    -1 for "no entry"; sink [H] fp32 (a softmax-denominator term only, never part of the max).
    Returns [T, H, D] in q's dtype; a query without any valid index gets zeros.

    Vectorised over queries and heads; only the K/64 index blocks are looped over, so the working set is
    O(T·64·D + T·H·64) per block and never O(T·N).
    """
    return sparse_attention_on_keys(q, keys_with_zero_row([kv]), idx, sink, scale)


def keys_with_zero_row(parts: list[torch.Tensor]) -> torch.Tensor:
    """The KV rows of ``parts`` in fp32, in one tensor that ends with a zero row: every -1 slot reads it
    (as the kernel loads zeros for them), so invalid slots add exactly nothing to P·V without a masking
    pass over each gathered block. fp32 parts are copied once, to join them and append the row."""
    dim = parts[0].shape[-1]
    return torch.cat([*(p.float() for p in parts), parts[0].new_zeros(1, dim, dtype=torch.float32)])


def sparse_attention_on_keys(
    q: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """``sparse_attention`` with its keys already built by ``keys_with_zero_row``."""
    slots = max(1, -(-idx.shape[1] // BLOCK)) * BLOCK
    chunk = max(1, QUERY_CHUNK_ELEMENTS // (slots * q.shape[-1]))
    out = [_attend(q[i : i + chunk], keys, idx[i : i + chunk], sink, scale) for i in range(0, len(q), chunk)]
    return out[0] if len(out) == 1 else torch.cat(out)


def _attend(q: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """One pass of queries; ``keys`` are fp32 with a trailing zero row."""
    # Every block's rows gathered at once, the lists padded to whole blocks with the zero row.
    zero_row = len(keys) - 1
    idx = idx.long()
    invalid = idx < 0
    rows = torch.nn.functional.pad(torch.where(invalid, zero_row, idx), (0, -idx.shape[1] % BLOCK), value=zero_row)
    return attend_gathered(q, keys[rows], invalid, sink, scale)


def attend_gathered(
    q: torch.Tensor, keys: torch.Tensor | list[torch.Tensor], invalid: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """The kernel's block loop over keys already laid out per query: keys [T, slots, D] fp32 with slots the
    list width rounded up to whole blocks - or that tensor as pieces along the slots, each of whole blocks
    (the last may stop at the width) - and invalid [T, width] (True for a -1 slot). Every slot that is
    invalid or past the width must hold a finite key (zeros, as the kernel loads): its probability is 0,
    and 0 times a finite value adds exactly nothing to P·V.

    The kernel's tile is 64 slots wide whatever the list's width, so a short last block's logits are one
    [heads x 64] product (which the BLAS rounds differently from a narrower one); its sums and P·V use the
    real slots.
    """
    t_len, n_heads, dim = q.shape
    width = invalid.shape[1]
    p_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    qf = q.float()
    sink = sink.float()
    scale_t = torch.tensor(scale, dtype=torch.float32)
    m = torch.full((t_len, n_heads), -torch.inf, dtype=torch.float32, device=q.device)
    l_sum = torch.zeros((t_len, n_heads), dtype=torch.float32, device=q.device)
    acc = torch.zeros((t_len, n_heads, dim), dtype=torch.float32, device=q.device)
    invalid = invalid.unsqueeze(1)
    pieces = keys if isinstance(keys, list) else [keys]
    blocks = [(piece, b) for piece in pieces for b in range(0, piece.shape[1], BLOCK)]
    for (piece, b), start in zip(blocks, range(0, width, BLOCK), strict=True):
        end = min(start + BLOCK, width)
        k_blk = piece[:, b : b + BLOCK]
        z = (torch.bmm(qf, k_blk.transpose(1, 2)) * scale_t)[..., : end - start]
        z = z.masked_fill(invalid[..., start:end], -torch.inf)
        m_new = torch.maximum(m, z.amax(dim=-1))
        # Rows that have seen no valid entry yet keep m = -inf; use 0 there so that exp() gives 0, not NaN.
        m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
        alpha = torch.exp(m - m_safe)
        p = torch.exp(z - m_safe.unsqueeze(-1))
        l_sum = l_sum * alpha + p.sum(dim=-1)
        pv = torch.bmm(p.to(p_dtype).float(), k_blk[:, : end - start])
        acc.mul_(alpha.unsqueeze(-1)).add_(pv)  # in place: the same two roundings, no new [T, H, D] tensors
        m = m_new
    m_safe = torch.where(torch.isinf(m), 0.0, m)
    l_sum = l_sum + torch.exp(sink.unsqueeze(0) - m_safe)
    # l is 0 only with no valid entry and a -inf sink; acc is 0 then, and the output must be 0, not NaN.
    l_sum = torch.where(l_sum > 0, l_sum, 1.0)
    return (acc / l_sum.unsqueeze(-1)).to(q.dtype)
