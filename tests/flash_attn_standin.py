"""A CPU stand-in for the flash-attn package, for testing our glue without a GPU.

It has flash-attn 2.x's published signatures (``flash_attn_func`` and
``flash_attn_varlen_func``), checks what the CUDA kernels require of their
inputs (4-D/3-D layouts, last dim contiguous, one dtype for q/k/v, a positive
batch, int32 ``cu_seqlens`` and Python-int ``max_seqlen``, no zero-length key
sequence: out-of-bounds writes before flash-attn 2.6.3, PR #1155) and computes reference attention
in the inputs' dtype, with flash-attn's bottom-right causal alignment. It
records every call so tests can check layouts and flags. It is NOT flash-attn:
the real kernels are verified only on a GPU (``python -m benchmarks.gpu_check``).
"""

import math

import torch

__version__ = "2.7.4-standin"
calls = []


def _reference(q, k, v, *, softmax_scale, causal, dropout_p):
    # q: (Tq, H, d); k, v: (Tk, H, d)
    t_q, t_k = q.size(0), k.size(0)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        # flash-attn >= 2.1 aligns the causal mask to the bottom-right corner.
        allowed = torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout_p:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return torch.einsum("hqk,khd->qhd", weights, v)


def _check(name, x, ndim):
    if x.dim() != ndim:
        raise RuntimeError(f"{name} must be {ndim}-D, got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise RuntimeError(f"{name} must have contiguous last dimension")


def _check_all(q, k, v, ndim, batch):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(name, x, ndim)
    if not q.dtype == k.dtype == v.dtype:
        raise RuntimeError(f"query, key and value must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if batch <= 0:
        raise RuntimeError("batch size must be positive")  # flash_api.cpp's TORCH_CHECK


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (B, Tq, H, d); k, v: (B, Tk, H, d) -> (B, Tq, H, d)."""
    _check_all(q, k, v, 4, q.size(0))
    calls.append(dict(fn="flash_attn_func", q=tuple(q.shape), k=tuple(k.shape), dropout_p=dropout_p,
                      softmax_scale=softmax_scale, causal=causal, deterministic=deterministic))
    return torch.stack([
        _reference(q[b], k[b], v[b], softmax_scale=softmax_scale, causal=causal, dropout_p=dropout_p)
        for b in range(q.size(0))
    ])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """q: (total_q, H, d); k, v: (total_k, H, d); cu_seqlens int32 (B + 1) -> (total_q, H, d)."""
    _check_all(q, k, v, 3, cu_seqlens_q.numel() - 1)
    for name, longest in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if type(longest) is not int:  # the custom op's schema takes an int
            raise RuntimeError(f"{name} must be a Python int, got {type(longest).__name__}")
    for name, cu, total, longest in (("cu_seqlens_q", cu_seqlens_q, q.size(0), max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.size(0), max_seqlen_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1:
            raise RuntimeError(f"{name} must be 1-D int32, got {cu.dtype} {tuple(cu.shape)}")
        lengths = cu.diff()
        if int(cu[0]) != 0 or int(cu[-1]) != total or (lengths < 0).any():
            raise RuntimeError(f"{name} {cu.tolist()} does not partition {total} tokens")
        if int(lengths.max()) > longest:
            raise RuntimeError(f"max_seqlen {longest} < longest sequence {int(lengths.max())} in {name}")
    if (cu_seqlens_k.diff() == 0).any():
        raise RuntimeError("zero-length key sequence (out-of-bounds writes before flash-attn 2.6.3, PR #1155)")
    calls.append(dict(fn="flash_attn_varlen_func", q=tuple(q.shape), k=tuple(k.shape), dropout_p=dropout_p,
                      softmax_scale=softmax_scale, causal=causal, deterministic=deterministic,
                      cu_seqlens_q=cu_seqlens_q.tolist(),
                      cu_seqlens_k=cu_seqlens_k.tolist(), max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k))
    out = torch.empty_like(q)
    for b in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        out[qs:qe] = _reference(q[qs:qe], k[ks:ke], v[ks:ke], softmax_scale=softmax_scale,
                                causal=causal, dropout_p=dropout_p)
    return out
