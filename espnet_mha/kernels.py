"""The attention kernels behind the backends of :mod:`espnet_mha.dispatch`: PyTorch
SDPA, the stock layer's explicit math, and the flash-attn glue (layouts,
``cu_seqlens``, unpadding and re-padding).

Pure functions on heads-first tensors; which one runs for a call is decided in
:mod:`espnet_mha.dispatch` only.
"""

import math

import torch
import torch.nn.functional as F

from espnet_mha import checks, compile_policy, masks


def sdpa_attention(q, k, v, keep, *, causal, dropout_p, additive=False):
    """Attention through PyTorch SDPA.

    Args:
        q: ``(B, H, T1, d_k)``; k, v: ``(B, H, T2, d_k)``.
        keep: None or bool ``(B or 1, T1 or 1, T2)``; without empty rows unless
            ``additive`` (then their context is finite, to be zeroed).
        causal: top-left causal mask; only with ``keep=None``.
        dropout_p: dropout on the attention weights.
        additive: hand SDPA :func:`additive_mask` of ``keep`` (the caller's
            :func:`takes_empty_rows`), not the bool mask.

    Returns:
        ``(B, H, T1, d_k)``.
    """
    if keep is not None and additive:
        # The dtype SDPA computes in: autocast casts a float32 mask's lowest value to -inf in float16.
        attn_mask = additive_mask(keep, checks.compute_dtype(q))
    else:
        attn_mask = None if keep is None else keep.unsqueeze(1)  # (b, 1, m, T2)
    if attn_mask is not None and attn_mask.is_cuda and attn_mask.dtype == torch.bool:
        attn_mask = aligned_mask(attn_mask)
    if attn_mask is None and q.device.type == "cpu":
        # Without a mask (also with is_causal), SDPA's CPU kernel returns zeros for a
        # query row whose scores are all NaN (a NaN in the query, or in a key column),
        # where the stock layer gives NaN (pytorch #141128, since torch 2.5, still in
        # 2.11). With a mask it propagates the NaN; an explicit one costs 1-5% on
        # sequences, and ~2 us on a decoding step when it is a remembered zero mask.
        if causal:
            attn_mask, causal = masks.causal_keep(q.size(-2), k.size(-2), q.device).unsqueeze(1), False
        elif compile_policy.plain_eager():
            attn_mask = zero_mask(k.size(-2), checks.compute_dtype(q), q.device)
        else:  # a graph keeps no Python dict: a mask of its own
            attn_mask = torch.ones(1, 1, 1, k.size(-2), dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal)


# Zero masks handed to unmasked CPU SDPA calls, per (T2, dtype, device); emptied when full.
_ZERO_MASKS = {}
_MAX_ZERO_MASKS = 64


def zero_mask(t2, dtype, device):
    """An additive mask of zeros ``(1, 1, 1, T2)`` in ``dtype``: what an unmasked CPU SDPA
    call gets so that the kernel keeps NaN rows (see :func:`sdpa_attention`). Made once
    per length and remembered: a decoding step then pays ~2 us for it, where making a
    bool mask and SDPA's conversion of it cost ~7 us (2 cores). Made outside inference
    mode, so autograd may save it; it is never written to."""
    key = (t2, dtype, device)
    mask = _ZERO_MASKS.get(key)
    if mask is None:
        if len(_ZERO_MASKS) >= _MAX_ZERO_MASKS:
            _ZERO_MASKS.clear()  # atomic when threads share it; masks forgotten are made again
        with torch.inference_mode(False), torch.no_grad():
            mask = _ZERO_MASKS[key] = torch.zeros(1, 1, 1, t2, dtype=dtype, device=device)
    return mask


def takes_empty_rows(q):
    """Whether a masked SDPA call on ``q`` gets the additive mask of :func:`additive_mask`:
    eager calls on CUDA that compute in a dtype with at least float32's range. There SDPA would turn
    a bool mask into a float one (two kernel launches) and the memory-efficient kernel copy
    it into an aligned buffer (two or three more), and masks without empty rows need three
    more (:func:`masks.guard_empty_rows`): at ESPnet's sizes a layer's call is bound by its
    launches (an H200 measured 491 us against 644 us for a masked cross-attention forward,
    B=8, T1=60, T2=300, D=256, float32).

    Not in float16: a score plus its lowest value (-65504, spaced 32 apart there) rounds
    to -inf once the score is below -16, and a fully masked row of -inf gave NaN query
    gradients on an H200 (``benchmarks.gpu_check``). Not on the CPU, nor under
    ``torch.compile`` (Inductor fuses the bool path), a capture or functorch transforms.
    """
    return q.is_cuda and checks.compute_dtype(q) != torch.float16 and compile_policy.plain_eager()


def additive_mask(keep, dtype, multiple=8):
    """SDPA's additive mask for a bool keep mask ``(b, m, T2)``: ``(b, 1, m, T2)``, 0 where
    kept and ``dtype``'s lowest value where masked (the value the stock layer fills masked
    scores with), a view into a buffer whose rows start at multiples of ``multiple``
    elements (what the memory-efficient kernel wants, PR #114173; it copies other masks).

    A finite value serves fully masked rows too: their weights are finite (equal
    scores, or nearly), so the caller only zeroes their context, with no guard against
    the kernels' ways with rows of -inf (NaN in some). A masked key of a row that keeps
    any gets weight exactly 0, unless a kept score is below the masked one by more than
    the lowest value's magnitude (float16 does not get this mask, see
    :func:`takes_empty_rows`).
    """
    t2 = keep.size(-1)
    buffer = torch.empty(*keep.shape[:-1], -(-t2 // multiple) * multiple, dtype=dtype, device=keep.device)
    bias = buffer[..., :t2].fill_(torch.finfo(dtype).min).masked_fill_(keep, 0.0)
    return bias.unsqueeze(1)


def aligned_mask(mask, multiple=8):
    """A copy of ``mask`` whose last dimension is contiguous and whose rows start at
    multiples of ``multiple`` elements (a view into a padded buffer).

    The fused GPU kernels need the mask's last dimension contiguous (PR #158424),
    and under Inductor the memory-efficient kernel wants it aligned to 8 (PR #114173).
    """
    t2 = mask.size(-1)
    padded = mask.new_zeros(*mask.shape[:-1], -(-t2 // multiple) * multiple)
    padded[..., :t2] = mask
    return padded[..., :t2]


def math_attention(q, k, v, keep, *, dropout_p, training):
    """The stock layer's explicit attention (``forward_attention``'s math).

    Args:
        q: ``(B, H, T1, d_k)``; k, v: ``(B, H, T2, d_k)``.
        keep: None or bool ``(b, m, T2)``; empty rows are allowed (zero weights).
        dropout_p, training: dropout on the weights, as ``nn.Dropout``.

    Returns:
        (context ``(B, H, T1, d_k)``, weights ``(B, H, T1, T2)`` before dropout).
    """
    # A single batch (a decoding step against a shared beam cache) takes 3-D products,
    # and dividing in place and skipping an inactive dropout save a few microseconds
    # of a ~100 us step (same values).
    single = q.size(0) == 1 and not torch.jit.is_tracing()  # a trace would keep it for every batch
    if single:
        scores = torch.bmm(q[0], k[0].transpose(-2, -1)).unsqueeze(0)
    else:
        scores = torch.matmul(q, k.transpose(-2, -1))
    weights = stock_weights(scores.div_(math.sqrt(q.size(-1))), keep)
    dropped = F.dropout(weights, dropout_p, training) if training and dropout_p > 0 else weights
    context = torch.bmm(dropped[0], v[0]).unsqueeze(0) if single else torch.matmul(dropped, v)
    return context, weights


def stock_weights(scores, keep):
    """softmax with the stock masking: masked scores get ``finfo.min``, masked weights 0.

    Args:
        scores: ``(B, H, T1, T2)``.
        keep: None or bool ``(b, m, T2)``.
    """
    if keep is None:
        return torch.softmax(scores, dim=-1)
    masked = ~keep.unsqueeze(1)  # (b, 1, m, T2)
    scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1).masked_fill(masked, 0.0)


def flash_attention(q, k, v, keep, *, causal, dropout_p, module):
    """Attention through the flash-attn package.

    Args:
        q: ``(B, H, T1, d_k)``; k, v: ``(B, H, T2, d_k)``, last dim contiguous.
        keep: None, or a bool key-padding mask ``(b, 1, T2)`` with no empty rows
            (zero-length keys made flash-attn write out of bounds before 2.6.3, PR #1155).
        causal: causal mask (self-attention, T1 == T2, ``keep=None`` only).
        dropout_p: dropout on the attention weights.
        module: the ``flash_attn`` module (or a stand-in with its signatures).

    Returns:
        ``(B, H, T1, d_k)``.
    """
    scale = q.size(-1) ** -0.5  # the stock 1/sqrt(d_k), passed explicitly
    # flash-attn's backward is deterministic only when asked (it does not read torch's flag).
    deterministic = torch.are_deterministic_algorithms_enabled()
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # flash-attn's (B, T, H, d_k)
    if keep is None:
        out = module.flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal,
                                     deterministic=deterministic)
        return out.transpose(1, 2)
    batch, t1, heads, d_k = q.shape
    t2 = k.size(1)
    keep_k = keep[:, 0].expand(batch, t2)
    lengths = keep_k.sum(dim=-1, dtype=torch.int32)
    cu_seqlens_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    cu_seqlens_q = torch.arange(
        0, (batch + 1) * t1, t1, dtype=torch.int32, device=q.device
    )
    index = keep_k.reshape(-1).nonzero(as_tuple=True)[0]
    k_unpadded = k.reshape(batch * t2, heads, d_k).index_select(0, index)
    v_unpadded = v.reshape(batch * t2, heads, d_k).index_select(0, index)
    # max_seqlen_k: the padded length, an upper bound known from the shape, so
    # no data-dependent Python int becomes a compile guard.
    out = module.flash_attn_varlen_func(
        q.reshape(batch * t1, heads, d_k),
        k_unpadded,
        v_unpadded,
        cu_seqlens_q,
        cu_seqlens_k,
        t1,
        t2,
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=False,
        deterministic=deterministic,
    )
    return out.view(batch, t1, heads, d_k).transpose(1, 2)
