"""The layer's computation as pure functions of tensors (what ``torch.compile`` traces).

Parameters come in as arguments, so one compiled graph serves every layer of a
model with the same configuration. Shapes: B batch, T1 query time, T2 key
time, D = n_feat, H = n_head, d_k = D / H. The fused projection ``w_qkv`` is
``(3D, D)`` with rows ordered q, k, v.
"""

import torch.nn.functional as F
import torch

from espnet_mha import dispatch


def split_heads(x, n_head):
    """``(..., T, D)`` -> ``(..., T, H, d_k)`` (a view)."""
    return x.unflatten(-1, (n_head, x.size(-1) // n_head))


def project_query(query, w_qkv, b_qkv):
    """Query projection ``(..., D)`` -> ``(..., D)`` with the q rows of the fused weight."""
    d = query.size(-1)
    return F.linear(query, w_qkv[:d], b_qkv[:d])


def project_memory(memory, w_qkv, b_qkv):
    """Key/value projection of the memory in one GEMM.

    Args:
        memory: ``(B, T2, D)``. A memory expanded over the batch with stride 0
            (how ``BatchBeamSearch`` passes the encoder output) is projected once.

    Returns:
        ``(b, T2, 2D)``, keys then values, with ``b = 1`` for a stride-0 memory.
    """
    d = memory.size(-1)
    if memory.size(0) > 1 and memory.stride(0) == 0:
        memory = memory[:1]
    return F.linear(memory, w_qkv[d:], b_qkv[d:])


def split_kv(kv, n_head):
    """``(b, T2, 2D)`` -> keys, values ``(b, T2, H, d_k)`` (views)."""
    k, v = kv.chunk(2, dim=-1)
    return split_heads(k, n_head), split_heads(v, n_head)


def attend(query, memory, keep, w_qkv, b_qkv, w_out, b_out, *,
           n_head, causal, dropout_p, training, backend):
    """Multi-head attention over whole sequences (the layer's ``forward``).

    Args:
        query: ``(B, T1, D)``.
        memory: ``(B, T2, D)``, or None for self-attention (one fused GEMM).
        keep: None or bool ``(b, m, T2)``, True = attend.
        w_qkv, b_qkv: fused projection ``(3D, D)``, ``(3D,)``.
        w_out, b_out: output projection.
        n_head: H.
        causal: add a causal mask (self-attention).
        dropout_p: dropout on the attention weights.
        training: training flag (dropout of the math path).
        backend: a selected backend (``dispatch.FLASH_ATTN/SDPA/MATH``).

    Returns:
        (output ``(B, T1, D)``, attention weights ``(B, H, T1, T2)`` or None).
    """
    if memory is None:
        q, k, v = split_heads(F.linear(query, w_qkv, b_qkv), 3 * n_head).chunk(3, dim=-2)
    else:
        q = split_heads(project_query(query, w_qkv, b_qkv), n_head)
        k, v = split_kv(F.linear(memory, w_qkv[query.size(-1):], b_qkv[query.size(-1):]), n_head)
    context, weights = dispatch.run(
        backend, q, k, v, keep, causal=causal, dropout_p=dropout_p, training=training
    )
    return F.linear(context, w_out, b_out), weights


def attend_cached(query, kv, keep, w_qkv, b_qkv, w_out, b_out, *, n_head, backend):
    """One decoding step of cross-attention against cached keys/values.

    Args:
        query: ``(B, D)``.
        kv: ``(b, T2, 2D)`` with ``b`` in ``{1, B}``.
        keep: None or bool ``(b', 1, T2)`` with ``b'`` in ``{1, B}``.

    Returns:
        (output ``(B, D)``, weights ``(B, H, 1, T2)`` from the math backend or None).

    With a shared cache (``b = 1``) the B queries are folded into the time axis
    of a single batch, so the beam runs as one GEMM-shaped attention instead of
    B matrix-vector products; the mask follows as a per-query mask.
    """
    batch = query.size(0)
    q = split_heads(project_query(query, w_qkv, b_qkv), n_head)  # (B, H, d_k)
    k, v = split_kv(kv, n_head)
    if kv.size(0) == 1:
        q = q.unsqueeze(0)  # (1, B, H, d_k)
        keep = None if keep is None else keep.transpose(0, 1)  # (1, b', T2)
    else:
        q = q.unsqueeze(1)  # (B, 1, H, d_k)
    context, weights = dispatch.run(backend, q, k, v, keep, causal=False, dropout_p=0.0, training=False)
    if weights is not None and kv.size(0) == 1:
        weights = weights.transpose(0, 2)  # (1, H, B, T2) -> (B, H, 1, T2)
    return F.linear(context.reshape(batch, -1), w_out, b_out), weights


def step_self(query, cache, keep, w_qkv, b_qkv, w_out, b_out, *, n_head, backend):
    """One step of causal self-attention with a growing key/value cache.

    Args:
        query: ``(B, D)``, the newest position.
        cache: None or ``(b, t, 2D)`` keys/values of the previous positions,
            ``b`` in ``{1, B}``.
        keep: None or bool ``(b', 1, t + 1)``.

    Returns:
        (output ``(B, D)``, new cache ``(B, t + 1, 2D)``, weights ``(B, H, 1, t + 1)`` or None).
    """
    batch, d = query.shape
    qkv = F.linear(query, w_qkv, b_qkv)
    new = qkv[:, None, d:]  # (B, 1, 2D)
    if cache is not None:
        new = torch.cat([cache.expand(batch, -1, -1), new], dim=1)
    k, v = split_kv(new, n_head)
    q = split_heads(qkv[:, None, :d], n_head)  # (B, 1, H, d_k)
    context, weights = dispatch.run(backend, q, k, v, keep, causal=False, dropout_p=0.0, training=False)
    return F.linear(context.reshape(batch, d), w_out, b_out), new, weights
