"""When the ``flash_attn`` backend can serve a call: the flash-attn package, the GPU, the
dtype, the head size and the mask (:func:`flash_attn_refusal`). The other backends' rules,
and the choice between them, are in :mod:`espnet_mha.dispatch`.
"""

import torch

from espnet_mha import masks, optional

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
FLASH_MIN_CAPABILITY = (8, 0)
# flash-attn 2's kernels are built for sm80-sm90 (Ampere, Ada, Hopper); older releases
# refuse sm100/sm120 and wheels without those kernels fail to launch (flash-attn #1540,
# #2168), so newer GPUs go to SDPA.
FLASH_MAX_MAJOR = 9
# Its backward for head sizes above 192 needs sm80 or sm90 (mha_bwd in flash_api.cpp).
FLASH_BIG_HEAD_BACKWARD = (192, ((8, 0), (9, 0)))


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
