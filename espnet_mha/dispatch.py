"""Which attention kernel runs: the rules, written once (the kernels are in :mod:`espnet_mha.kernels`;
flash-attn's own limits in :mod:`espnet_mha.flash_rules`).

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
when weights are requested, for unmasked CPU decoding steps of a beam over one
shared cache (GEMM-shaped, faster than SDPA with the mask it needs there to keep
NaN, pytorch #141128), for unmasked CPU calls captured by
``torch.jit.trace``/``torch.export`` (that mask would be frozen at the example's
size), or when SDPA is known broken for the call (compiled float64 backward on
CPU in torch <= 2.11, pytorch #185539). Asking for a backend that cannot serve a call
raises :class:`BackendUnavailableError` with the reason; nothing is switched off
permanently, and kernel errors propagate.
"""

import logging
import os
from dataclasses import dataclass

import torch

from espnet_mha import checks, kernels, masks, optional
from espnet_mha.flash_rules import flash_attn_refusal  # select_backend calls it by this name (tests replace it)

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

class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve a call; the message says why and what to do."""


def check_backend(option):
    """``option`` as one of ``BACKENDS``: None is "auto"; any case, surrounding spaces
    ignored, as in the environment variable.

    Raises:
        ValueError: not a known backend.
    """
    backend = AUTO if option is None else checks.option_word(option)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {option!r}")
    return backend


def resolve_backend(option):
    """The backend a layer is built with: ``$ESPNET_MHA_BACKEND`` if set, else ``option``.

    Args:
        option: see :func:`check_backend`.

    Raises:
        ValueError: option or the environment variable is not a known backend.
    """
    backend = check_backend(option)  # checked even where the environment overrides it
    env = os.environ.get(ENV_BACKEND, "").strip().lower()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={env!r} is not one of {BACKENDS}")
        if option is not None and backend != env:
            logger.info("espnet_mha: %s=%s overrides backend=%r", ENV_BACKEND, env, option)
        return env
    return backend


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
        shared_step: a decoding step whose queries all attend one cache: a beam over one
            shared cross-attention cache (folded into one batch, GEMM-shaped), or one hypothesis.
        empty: the batch or a time axis is empty (flash-attn needs positive sizes).
        grad: the attention's backward may follow: gradients are on and the query, the
            memory (or cache) or a q/k/v projection parameter requires them.
        captured: the call is captured by ``torch.jit.trace`` or ``torch.export``
            (see :func:`espnet_mha.compile_policy.capturing`).
        forward_ad: a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``).
        dropout_module: the type name of a dropout module only the math path can call
            (replaced, hooked or in-place, see ``StockHelpers._custom_dropout``), or "".
        sdpa_kernels: None while SDPA's math kernel is enabled (the default), else
            :func:`sdpa_kernels` (``torch.nn.attention.sdpa_kernel`` restricts SDPA).
    """

    device: torch.device
    dtype: torch.dtype
    d_k: int
    mask_kind: str
    causal: bool = False
    need_weights: bool = False
    compiled: bool = False
    shared_step: bool = False
    empty: bool = False
    grad: bool = False
    captured: bool = False
    forward_ad: bool = False
    dropout_module: str = ""
    sdpa_kernels: tuple = None


def sdpa_kernels(dropout_p):
    """None while SDPA may fall back to its math kernel (the default); else, under a
    restriction by ``torch.nn.attention.sdpa_kernel`` (or ``torch.backends.cuda.enable_*_sdp``),
    (the names of the kernels it allows, whether the call applies dropout: ``dropout_p()``
    is nonzero). One flag read on every call (part of a layer's memo of decisions). Not
    read while torch.compile or torch.export traces (strict export refuses the flag
    reads): a traced call under such a restriction raises PyTorch's error."""
    if torch.compiler.is_compiling() or torch._C._get_math_sdp_enabled():
        return None
    enabled = tuple(name for name, on in (("flash", torch._C._get_flash_sdp_enabled()),
                                          ("efficient", torch._C._get_mem_efficient_sdp_enabled()),
                                          ("cudnn", torch._C._get_cudnn_sdp_enabled())) if on)
    return enabled, bool(dropout_p())


def sdpa_restriction(call):
    """Why SDPA has no kernel for ``call`` under an ``sdpa_kernel`` restriction ("" if it has).

    On CPU, SDPA has its math kernel and a flash kernel, which takes no dropout and no
    empty axis. On CUDA, PyTorch chooses among the allowed kernels by rules of its own
    (dtype, head size, GPU), so only a restriction that allows none is refused here."""
    if call.sdpa_kernels is None:
        return ""
    enabled, dropout = call.sdpa_kernels
    if call.device.type == "cpu":
        if "flash" in enabled and not dropout and not call.empty:
            return ""
        why = " (its CPU flash kernel takes no dropout and no empty batch or time axis)" if "flash" in enabled else ""
    elif enabled:
        return ""
    else:
        why = ""
    allowed = ", ".join(enabled) or "no kernel"
    return (f"torch.nn.attention.sdpa_kernel allows SDPA {allowed}, which cannot serve this call on "
            f"{call.device.type}{why}")


def sdpa_refusal(call):
    """Why ``auto`` should not use SDPA for ``call`` ("" if it can)."""
    if _COMPILED_FP64_CPU_SDPA_BROKEN and call.compiled and call.device.type == "cpu" and call.dtype == torch.float64:
        return f"compiled float64 SDPA backward fails on CPU in torch {torch.__version__} (pytorch #185539)"
    return sdpa_restriction(call)


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
        ValueError: ``requested`` is not one of ``BACKENDS`` (the layer checks its
            ``backend`` when it is set; this guards other callers).
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if call.dropout_module:
        if requested == MATH:
            return MATH, ""  # forced: nothing was given up (a probe saw a fallback reported here)
        if requested == AUTO:
            return MATH, f"the dropout module ({call.dropout_module}) is called on the attention weights"
        raise BackendUnavailableError(
            f"backend={requested!r} cannot call the layer's dropout module ({call.dropout_module}: "
            "replaced, hooked or in-place): only the math path applies it to the attention "
            "weights as the stock layer does. Use backend='math' or 'auto', or a plain nn.Dropout."
        )
    if call.need_weights:
        if requested == AUTO:
            return MATH, "keep_attn=True: only the math path returns the attention weights"
        if requested == MATH:
            return MATH, ""
        raise BackendUnavailableError(
            f"backend={requested!r} cannot return attention weights; "
            "keep_attn=True needs backend='math' or 'auto'"
        )
    if requested == SDPA:
        restriction = sdpa_restriction(call)
        if restriction:
            raise BackendUnavailableError(
                f"backend='sdpa' cannot serve this call: {restriction}. Allow SDPBackend.MATH in "
                "sdpa_kernel, or use backend='auto' (or 'math') to run the math path.")
        broken = sdpa_refusal(call)
        if broken and call.grad:
            raise BackendUnavailableError(
                f"backend='sdpa' cannot serve this call, whose backward would fail: {broken}. Use "
                "backend='auto' (or 'math'), compile=False, or torch.no_grad() for a call without backward.")
        return SDPA, ""
    if requested == MATH:
        return MATH, ""
    if call.forward_ad and requested == AUTO:
        # Tangents of dual tensors: only the math path has forward derivatives.
        return MATH, "forward-mode AD: SDPA's CPU kernel and flash-attn have no forward derivative"
    refusal = flash_attn_refusal(call)
    if requested == FLASH_ATTN and refusal:
        raise BackendUnavailableError(
            f"backend='flash_attn' cannot serve this call: {refusal}. "
            f"Use backend='auto' (or {ENV_BACKEND}=auto) to fall back to SDPA."
        )
    if not refusal:
        return FLASH_ATTN, ""
    if requested == AUTO and call.device.type == "cpu" and call.mask_kind == masks.NO_MASK \
            and (call.shared_step or call.captured):
        # SDPA's CPU kernel needs an explicit mask to keep NaN (see kernels.sdpa_attention).
        # A beam over one shared cache runs the explicit math ~8% faster even so (its
        # products are GEMMs), where caches per hypothesis or per utterance run SDPA 3-4x
        # faster than the math's matrix-vector products (measured, 2 cores). And a traced
        # graph would keep that mask at the example's size (the TorchScript ONNX exporter
        # stores it as a constant).
        return MATH, refusal
    sdpa = sdpa_refusal(call)
    return (MATH, f"{refusal}; {sdpa}") if sdpa else (SDPA, refusal)


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
        context, weights = kernels.math_attention(q, k, v, keep, dropout_p=dropout_p, training=training)
    else:
        additive = keep is not None and backend == SDPA and kernels.takes_empty_rows(q)
        if additive:
            rows_ok = keep.any(dim=-1, keepdim=True)
        elif keep is not None:
            keep, rows_ok = masks.guard_empty_rows(keep)
        if backend == SDPA:
            context = kernels.sdpa_attention(q, k, v, keep, causal=causal, dropout_p=dropout_p, additive=additive)
        else:
            context = kernels.flash_attention(
                q, k, v, keep, causal=causal, dropout_p=dropout_p,
                module=optional.flash_attn().module,
            )
    # (B, H, T1, d_k) -> (B, T1, D)
    context = masks.zero_empty_rows(context.transpose(1, 2).flatten(2), rows_ok)
    return context, weights
