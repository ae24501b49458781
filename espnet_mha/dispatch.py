"""Which attention kernel runs: the rules, written once, and the kernels.

Backends (names used everywhere, in options, ``last_backend`` and logs):

=============  ==============================================================
``flash_attn``  the flash-attn package: CUDA, fp16/bf16 (autocast included),
                sm80+, head size <= 256, and a mask it can express (none, key
                padding through ``flash_attn_varlen_func``, or causal without
                padding); never asked for attention weights.
``sdpa``        ``torch.nn.functional.scaled_dot_product_attention`` with a bool
                mask; PyTorch picks its flash / memory-efficient / cuDNN / math
                kernel. Serves every call that does not need the weights.
``math``        the stock layer's explicit softmax(QK^T/sqrt(d_k))V; the only
                backend that can keep the weights (``keep_attn=True``).
=============  ==============================================================

``auto`` takes the first of flash_attn, sdpa that can serve a call, and math
when weights are requested, for unmasked decoding steps on CPU (no mask needed
to keep NaN there, pytorch #141128), or when SDPA is known broken for the call
(compiled float64 backward on CPU in torch <= 2.11, pytorch #185539). Asking for a backend that cannot serve a call
raises :class:`BackendUnavailableError` with the reason; nothing is switched off
permanently, and kernel errors propagate.
"""

import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from espnet_mha import masks, optional

logger = logging.getLogger(__name__)

AUTO = "auto"
FLASH_ATTN = "flash_attn"
SDPA = "sdpa"
MATH = "math"
BACKENDS = (AUTO, FLASH_ATTN, SDPA, MATH)
ENV_BACKEND = "ESPNET_MHA_BACKEND"

# pytorch #185539 (fixed by PR #185573, after 2.11): under torch.compile, the
# CPU SDPA backward in float64 fails ("expected scalar type Double but found Float").
_COMPILED_FP64_CPU_SDPA_BROKEN = tuple(int(x) for x in torch.__version__.split(".")[:2]) <= (2, 11)

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
FLASH_MIN_CAPABILITY = (8, 0)
# flash-attn 2's kernels are built for sm80-sm90 (Ampere, Ada, Hopper); older releases
# refuse sm100/sm120 and wheels without those kernels fail to launch (flash-attn #1540,
# #2168), so newer GPUs go to SDPA.
FLASH_MAX_MAJOR = 9
# Its backward for head sizes above 192 needs sm80 or sm90 (mha_bwd in flash_api.cpp).
FLASH_BIG_HEAD_BACKWARD = (192, ((8, 0), (9, 0)))


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve a call; the message says why and what to do."""


def resolve_backend(option):
    """The backend a layer asks for: ``$ESPNET_MHA_BACKEND`` if set, else ``option``.

    Args:
        option: None (same as "auto") or one of ``BACKENDS``.

    Raises:
        ValueError: option or the environment variable is not a known backend.
    """
    env = os.environ.get(ENV_BACKEND, "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={env!r} is not one of {BACKENDS}")
        if option not in (None, env):
            logger.info("espnet_mha: %s=%s overrides backend=%r", ENV_BACKEND, env, option)
        return env
    if option is None:
        return AUTO
    if option not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {option!r}")
    return option


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know about one call (all static: no tensor data).

    Attributes:
        device: device of the projected tensors.
        dtype: dtype the attention runs in (the autocast dtype under autocast).
        d_k: head size.
        mask_kind: ``masks.NO_MASK``, ``masks.KEY_PADDING`` or ``masks.PER_QUERY``.
        causal: a causal mask applies.
        need_weights: the attention weights must be returned.
        compiled: the call runs under ``torch.compile``.
        decode_step: a decoding step (one query row per hypothesis).
        empty: the batch or a time axis is empty (flash-attn needs positive sizes).
        grad: gradients are recorded (a backward may follow).
    """

    device: torch.device
    dtype: torch.dtype
    d_k: int
    mask_kind: str
    causal: bool = False
    need_weights: bool = False
    compiled: bool = False
    decode_step: bool = False
    empty: bool = False
    grad: bool = False


def flash_attn_refusal(call):
    """Why flash-attn cannot serve ``call`` ("" if it can)."""
    info = optional.flash_attn()
    if not info.available:
        return info.reason
    if call.device.type != "cuda":
        return f"tensors are on {call.device.type}; flash-attn needs CUDA"
    if call.dtype not in FLASH_DTYPES:
        return f"dtype is {call.dtype}; flash-attn needs float16 or bfloat16 (use autocast)"
    if call.d_k > FLASH_MAX_HEAD_DIM:
        return f"head size d_k={call.d_k} exceeds flash-attn's {FLASH_MAX_HEAD_DIM}"
    if call.empty:
        return "the batch or a time axis is empty; flash-attn needs positive sizes"
    capability = optional.device_capability(call.device)
    if capability < FLASH_MIN_CAPABILITY or capability[0] > FLASH_MAX_MAJOR:
        return (
            f"GPU is {optional.capability_str(capability)}; flash-attn 2's kernels are built for "
            f"{optional.capability_str(FLASH_MIN_CAPABILITY)} to sm{FLASH_MAX_MAJOR}x"
        )
    big_head, backward_capabilities = FLASH_BIG_HEAD_BACKWARD
    if call.grad and call.d_k > big_head and capability not in backward_capabilities:
        return (f"head size d_k={call.d_k} > {big_head}: flash-attn's backward needs sm80 or sm90, "
                f"the GPU is {optional.capability_str(capability)}")
    if call.mask_kind == masks.PER_QUERY:
        return "the mask differs per query (B, T1, T2); flash-attn takes key padding only"
    if call.causal and call.mask_kind != masks.NO_MASK:
        return "causal attention with a padding mask cannot be unpadded without breaking causality"
    if call.mask_kind == masks.KEY_PADDING and call.compiled:
        # Unpadding has a data-dependent size (nonzero), which would break the graph.
        return "key padding under torch.compile (unpadding is data-dependent)"
    if call.compiled and not info.custom_ops:
        return f"flash-attn {info.version} registers no torch custom ops; torch.compile would break the graph"
    return ""


def sdpa_refusal(call):
    """Why ``auto`` should not use SDPA for ``call`` ("" if it can)."""
    if _COMPILED_FP64_CPU_SDPA_BROKEN and call.compiled and call.device.type == "cpu" and call.dtype == torch.float64:
        return f"compiled float64 SDPA backward fails on CPU in torch {torch.__version__} (pytorch #185539)"
    return ""


def select_backend(requested, call):
    """Choose the kernel for one call.

    Args:
        requested: one of ``BACKENDS``.
        call: an :class:`AttentionCall`.

    Returns:
        (backend, fallback): the backend to run, and why a faster one was not
        used ("" when nothing was given up).

    Raises:
        BackendUnavailableError: ``requested`` is forced and cannot serve the call.
        ValueError: ``requested`` is not one of ``BACKENDS`` (e.g. a layer's
            ``backend`` attribute set after construction).
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if call.need_weights:
        if requested in (AUTO, MATH):
            return MATH, ""
        raise BackendUnavailableError(
            f"backend={requested!r} cannot return attention weights; "
            "keep_attn=True needs backend='math' or 'auto'"
        )
    if requested in (MATH, SDPA):
        return requested, ""
    refusal = flash_attn_refusal(call)
    if requested == FLASH_ATTN and refusal:
        raise BackendUnavailableError(
            f"backend='flash_attn' cannot serve this call: {refusal}. "
            f"Use backend='auto' (or {ENV_BACKEND}=auto) to fall back to SDPA."
        )
    if not refusal:
        return FLASH_ATTN, ""
    if requested == AUTO and call.decode_step and call.device.type == "cpu" and call.mask_kind == masks.NO_MASK:
        # SDPA's CPU kernel needs an explicit mask to keep NaN (see sdpa_attention),
        # which costs a beam step ~20 us; the explicit math keeps it for ~10 us (measured).
        return MATH, refusal
    sdpa = sdpa_refusal(call)
    return (MATH, f"{refusal}; {sdpa}") if sdpa else (SDPA, refusal)


def sdpa_attention(q, k, v, keep, *, causal, dropout_p):
    """Attention through PyTorch SDPA.

    Args:
        q: ``(B, H, T1, d_k)``; k, v: ``(B, H, T2, d_k)``.
        keep: None or bool ``(B or 1, T1 or 1, T2)`` with no empty rows.
        causal: top-left causal mask; only with ``keep=None``.
        dropout_p: dropout on the attention weights.

    Returns:
        ``(B, H, T1, d_k)``.
    """
    attn_mask = None if keep is None else keep.unsqueeze(1)  # (b, 1, m, T2)
    if attn_mask is not None and attn_mask.is_cuda:
        attn_mask = aligned_mask(attn_mask)
    if attn_mask is None and q.device.type == "cpu":
        # Without a mask (also with is_causal), SDPA's CPU kernel returns zeros for a
        # query row whose scores are all NaN (a NaN in the query, or in a key column),
        # where the stock layer gives NaN (pytorch #141128, since torch 2.5, still in
        # 2.11). With a mask it propagates the NaN; an explicit one costs 1-5% on
        # sequences (decoding steps take the math path instead, see select_backend).
        if causal:
            attn_mask, causal = masks.causal_keep(q.size(-2), k.size(-2), q.device).unsqueeze(1), False
        else:
            attn_mask = torch.ones(1, 1, 1, k.size(-2), dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal)


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
    single = q.size(0) == 1
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


def run(backend, q, k, v, keep, *, causal, dropout_p, training):
    """Run one attention call on ``backend`` with the stock mask semantics.

    Args:
        backend: ``FLASH_ATTN``, ``SDPA`` or ``MATH`` (already selected).
        q: ``(B, H, T1, d_k)``; k, v: ``(B, H, T2, d_k)``.
        keep: None or bool ``(b, m, T2)``; may contain fully masked rows.
        causal: add a top-left causal mask (self-attention).
        dropout_p: dropout probability (0 in eval).
        training: the layer's training flag (math path's ``F.dropout``).

    Returns:
        (context ``(B, T1, H * d_k)`` with fully masked rows zeroed, weights or None).
    """
    t1, t2 = q.size(2), k.size(2)
    if causal and keep is not None:
        keep = keep & masks.causal_keep(t1, t2, q.device)
        causal = False
    if causal and backend == MATH:
        keep = masks.causal_keep(t1, t2, q.device)
    weights, rows_ok = None, None
    if backend == MATH:
        context, weights = math_attention(q, k, v, keep, dropout_p=dropout_p, training=training)
    else:
        if keep is not None:
            keep, rows_ok = masks.guard_empty_rows(keep)
        if backend == SDPA:
            context = sdpa_attention(q, k, v, keep, causal=causal, dropout_p=dropout_p)
        else:
            context = flash_attention(
                q, k, v, keep, causal=causal, dropout_p=dropout_p,
                module=optional.flash_attn().module,
            )
    # (B, H, T1, d_k) -> (B, T1, D)
    context = masks.zero_empty_rows(context.transpose(1, 2).flatten(2), rows_ok)
    return context, weights
