"""The layer's computation as pure functions of tensors (what ``torch.compile`` traces).

Parameters come in as arguments, so one compiled graph serves every layer of a
model with the same configuration. Shapes: B batch, T1 query time, T2 key
time, D = n_feat, H = n_head, d_k = D / H. The fused projection ``w_qkv`` is
``(3D, D)`` with rows ordered q, k, v. Attention runs on heads-first tensors
``(B, H, T, d_k)`` (SDPA's layout); decoding caches are stored that way,
``(b, 2, H, T2, d_k)`` (keys, values), so a step reads them without copying.
"""

import math

import torch
import torch.nn.functional as F

from espnet_mha import dispatch, kernels, packing


def heads(x, n_head):
    """``(B, T, D)`` -> heads-first ``(B, H, T, d_k)`` (a view)."""
    # view, not unflatten: the same view without unflatten's Python wrapper (~4 us a call).
    return x.view(x.shape[:-1] + (n_head, x.size(-1) // n_head)).transpose(-3, -2)


def kv_cache(kv, n_head):
    """Projected keys/values ``(b, T, 2D)`` -> the cache layout ``(b, 2, H, T, d_k)``."""
    b, t, two_d = kv.shape
    return kv.view(b, t, 2, n_head, two_d // (2 * n_head)).permute(0, 2, 3, 1, 4).contiguous()


def project_memory(memory, w_kv, b_kv, n_head):
    """Key/value projection of the memory in one GEMM, in the cache layout.

    Args:
        memory: ``(B, T2, D)``. A memory expanded over the batch with stride 0
            (how ``BatchBeamSearch`` passes the encoder output) is projected once.
        w_kv, b_kv: the key and value rows of the projection, ``(2D, D)`` and ``(2D,)``.

    Returns:
        ``(b, 2, H, T2, d_k)`` with ``b = 1`` for a stride-0 memory, else B.
    """
    d = memory.size(-1)
    memory = shared_memory(memory)
    if memory.is_inference() and torch.is_grad_enabled():
        # A frozen encoder run under inference_mode, a decoder trained on it: the batched
        # GEMM would save the inference tensor for backward, which autograd refuses.
        memory = memory.clone()
    if memory.size(0) == 1:
        # One memory: a GEMM per key/value head writes the cache layout directly,
        # where one GEMM plus the permuted copy of kv_cache costs ~25% more
        # (300 x 256 memory: 420 us against 565 us on 2 cores).
        d_k = d // n_head
        w_heads = w_kv.view(2 * n_head, d_k, d).transpose(1, 2)  # (2H, D, d_k)
        b_heads = b_kv.view(2 * n_head, 1, d_k)
        kv = torch.baddbmm(b_heads, memory.expand(2 * n_head, -1, -1), w_heads)  # (2H, T2, d_k)
        return kv.view(1, 2, n_head, memory.size(1), d_k)
    return kv_cache(F.linear(memory, w_kv, b_kv), n_head)


def shared_memory(memory):
    """``memory[:1]`` when the memory (or a key/value cache) is expanded over the batch
    with stride 0 (one memory, projected once; one cache, attended as one), else ``memory``."""
    return memory[:1] if memory.size(0) > 1 and memory.stride(0) == 0 else memory


def attend(query, memory, keep, w_qkv, b_qkv, w_out, b_out, *,
           n_head, causal, dropout_p, training, backend, key_lengths=None):
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
        key_lengths: None, or per-item key counts from :func:`packing.plan`
            (eager CPU only): keys and attention are then computed per item
            over its leading keys.

    Returns:
        (output ``(B, T1, D)``, attention weights ``(B, H, T1, T2)`` or None).
    """
    d = query.size(-1)
    if memory is None and key_lengths is None:
        # Split the projection along features before making heads: the backward then
        # concatenates the gradients straight into the projection's layout (one pass
        # instead of a concatenation plus a copy).
        q, k, v = (heads(x, n_head) for x in F.linear(query, w_qkv, b_qkv).chunk(3, dim=-1))
    else:
        # The query rows and the key/value rows, by split, not by slicing: the backward of
        # a slice fills a zero (3D, D) gradient for each part and adds them (at D = 512 and
        # a short batch that was most of a training step); split's concatenates the two.
        (w_q, w_kv), (b_q, b_kv) = w_qkv.split_with_sizes([d, 2 * d]), b_qkv.split_with_sizes([d, 2 * d])
        q = heads(F.linear(query, w_q, b_q), n_head)
        if key_lengths is not None:
            context = packing.attend_per_item(
                backend, q, query if memory is None else memory, keep, w_kv, b_kv, key_lengths,
                n_head=n_head, dropout_p=dropout_p, training=training,
            )
            return F.linear(context, w_out, b_out), None
        k, v = (heads(x, n_head) for x in F.linear(memory, w_kv, b_kv).chunk(2, dim=-1))
    context, weights = dispatch.run(
        backend, q, k, v, keep, causal=causal, dropout_p=dropout_p, training=training
    )
    return F.linear(context, w_out, b_out), weights


def query_head_weights(w_qkv, b_qkv, n_head):
    """The query rows (the first D) of ``w_qkv``/``b_qkv``, per head: views ``(H, D, d_k)``
    and ``(H, 1, d_k)``. The fused ``(3D, D)`` projection, or the stock ``linear_q``'s
    ``(D, D)`` weight itself.

    ``torch.baddbmm(b, query.expand(H, B, D), w)`` then gives the heads-first
    queries ``(H, B, d_k)`` directly. For a decoding step's 10-row query that is
    one batched GEMM that MKL spreads over the cores, where the ``(B, D) x (D, D)``
    GEMM runs on one (measured: 19.5 us against 23.5 us on 2 cores), and no
    transpose of the result is needed.
    """
    d = w_qkv.size(1)
    d_k = d // n_head
    return w_qkv[:d].view(n_head, d_k, d).transpose(1, 2), b_qkv[:d].view(n_head, 1, d_k)


def exact_query_scale(d_k):
    """The stock ``1/sqrt(d_k)`` when it is a power of two (``d_k`` a power of 4), else None.

    Only then can the query projection apply it (``baddbmm``'s ``alpha`` and
    ``beta``) without changing a bit of the scores the stock layer divides:
    scaling by a power of two commutes with every rounding.
    """
    if type(d_k) is int:
        return _EXACT_SCALES.get(d_k)
    # A size dynamo traces (SymInt): torch 2.5 traces neither math.frexp of it nor a dict lookup.
    for n in range(len(_EXACT_SCALES)):
        if d_k == 4 ** n:
            return 2.0 ** -n
    return None


# d_k -> 1/sqrt(d_k), for the d_k where that is a power of two.
_EXACT_SCALES = {4 ** n: 2.0 ** -n for n in range(32)}


def attend_cached(query, kv, keep, w_q_heads, b_q_heads, w_out, b_out, *, backend, dropout_p=0.0,
                  need_weights=True):
    """One decoding step of cross-attention against cached keys/values.

    Args:
        query: ``(B, D)``.
        kv: ``(b, 2, H, T2, d_k)`` with ``b`` in ``{1, B}``.
        keep: None or bool ``(b', 1, T2)`` with ``b'`` in ``{1, B}``.
        w_q_heads, b_q_heads: the query projection per head, from :func:`query_head_weights`.
        w_out, b_out: output projection.
        dropout_p: dropout on the attention weights (the layer's ``p`` in
            training, as the stock ``step``, which runs ``forward``; else 0).
        need_weights: return the math backend's weights (False lets the
            commonest step skip them).

    Returns:
        (output ``(B, D)``, weights ``(B, H, 1, T2)`` from the math backend or None).

    With a shared cache (``b = 1``) the B queries are folded into the time axis
    of a single batch, so the beam runs as one GEMM-shaped attention instead of
    B matrix-vector products; the mask follows as a per-query mask.
    """
    batch, d = query.shape
    n_head = w_q_heads.size(0)
    # A shared cache handed back as the step returned it, expanded over the beam: attended
    # as the one cache it is (as a per-hypothesis cache it ran B matrix-vector products,
    # 4.5x slower for 50 steps of beam 10 over 300 frames).
    kv = shared_memory(kv)
    # As few tensor ops as possible: each costs a microsecond or two, and a
    # decoding step is only ~100 us of kernels.
    if backend == dispatch.MATH and keep is None and not dropout_p and not need_weights and kv.size(0) == 1:
        # The commonest step (a beam over one shared cache, no mask, CPU): the stock
        # math straight on the (H, B, .) layout, with no reshaping in between, and
        # the scale applied by the query GEMM where that is exact (saves ~5 us).
        scale = exact_query_scale(w_q_heads.size(-1))
        if scale is None:
            q = torch.baddbmm(b_q_heads, query.expand(n_head, batch, d), w_q_heads)  # (H, B, d_k)
            scores = torch.bmm(q, kv[0, 0].transpose(1, 2)).div_(math.sqrt(q.size(-1)))  # (H, B, T2)
        else:
            q = torch.baddbmm(b_q_heads, query.expand(n_head, batch, d), w_q_heads, beta=scale, alpha=scale)
            scores = torch.bmm(q, kv[0, 0].transpose(1, 2))
        context = torch.bmm(torch.softmax(scores, dim=-1), kv[0, 1])  # (H, B, d_k)
        return F.linear(context.transpose(0, 1).reshape(batch, d), w_out, b_out), None
    q = torch.baddbmm(b_q_heads, query.expand(n_head, batch, d), w_q_heads)  # (H, B, d_k)
    context, weights = cached_context(q, kv, keep, backend=backend, dropout_p=dropout_p)
    return F.linear(context, w_out, b_out), weights


def cached_context(q, kv, keep, *, backend, dropout_p=0.0):
    """Attention of projected queries ``(H, B, d_k)`` over a cache ``(b, 2, H, T2, d_k)``.

    Returns:
        (context ``(B, D)``, weights ``(B, H, 1, T2)`` from the math backend or None).
    """
    n_head, batch, d_k = q.shape
    kv = shared_memory(kv)
    # The beam is folded into one batch only when that changes nothing but speed: with
    # dropout the weights keep the stock (B, H, 1, T2) layout, so the dropout mask is
    # drawn in the stock order (the same random numbers as the stock step); and a mask
    # per hypothesis stays a key-padding mask (flash-attn's varlen call can serve it,
    # where folded it would be one per query).
    shared = kv.size(0) == 1 and not dropout_p and (keep is None or keep.size(0) == 1)
    if shared:
        q = q.unsqueeze(0)  # (1, H, B, d_k)
        keep = None if keep is None else keep.transpose(0, 1)  # (1, b', T2)
    else:
        q = q.transpose(0, 1).unsqueeze(2)  # (B, H, 1, d_k)
        kv = kv.expand(batch, -1, -1, -1, -1)
    k, v = kv.unbind(1)
    # Unmasked steps skip dispatch.run's mask handling.
    if dropout_p > 0:
        context, weights = dispatch.run(backend, q, k, v, keep, causal=False, dropout_p=dropout_p, training=True)
    elif keep is None and backend == dispatch.SDPA:
        context, weights = kernels.sdpa_attention(q, k, v, None, causal=False, dropout_p=0.0), None
        context = context.transpose(1, 2)  # (b, B or 1, H, d_k)
    elif keep is None and backend == dispatch.MATH:
        context, weights = kernels.math_attention(q, k, v, None, dropout_p=0.0, training=False)
        context = context.transpose(1, 2)
    else:
        context, weights = dispatch.run(backend, q, k, v, keep, causal=False, dropout_p=0.0, training=False)
    if weights is not None and shared:
        weights = weights.transpose(0, 2)  # (1, H, B, T2) -> (B, H, 1, T2)
    return context.reshape(batch, n_head * d_k), weights


def step_self(query, cache, keep, w_qkv, b_qkv, w_out, b_out, *, n_head, backend, dropout_p=0.0):
    """One step of causal self-attention with a growing key/value cache.

    Args:
        query: ``(B, D)``, the newest position.
        cache: None or ``(b, 2, H, t, d_k)`` keys/values of the previous
            positions, ``b`` in ``{1, B}``.
        keep: None or bool ``(b', 1, t + 1)``.
        dropout_p: dropout on the attention weights (training only, else 0).

    Returns:
        (output ``(B, D)``, new cache ``(B, 2, H, t + 1, d_k)``, weights ``(B, H, 1, t + 1)`` or None).
    """
    context, new, weights = step_self_context(F.linear(query, w_qkv, b_qkv), cache, keep, n_head=n_head,
                                              backend=backend, dropout_p=dropout_p)
    return F.linear(context, w_out, b_out), new, weights


def step_self_context(qkv, cache, keep, *, n_head, backend, dropout_p=0.0):
    """:func:`step_self` from the projected newest position ``qkv`` ``(B, 3D)``: (context
    ``(B, D)``, new cache, weights or None)."""
    batch, d = qkv.size(0), qkv.size(1) // 3
    new = kv_cache(qkv[:, None, d:], n_head)  # (B, 2, H, 1, d_k)
    if cache is not None:
        new = torch.cat([cache.expand(batch, -1, -1, -1, -1), new], dim=3)
    q = heads(qkv[:, None, :d], n_head)  # (B, H, 1, d_k)
    context, weights = dispatch.run(backend, q, new[:, 0], new[:, 1], keep, causal=False,
                                    dropout_p=dropout_p, training=dropout_p > 0)
    return context.reshape(batch, d), new, weights
