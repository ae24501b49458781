"""ESPnet mask semantics, checked once at the public boundary.

ESPnet masks are ``(B, 1, T2)`` (key padding) or ``(B, T1, T2)`` (per query),
or any other shape the stock layer broadcasts (see :func:`keep_mask`), bool or numeric, and **nonzero means keep** (not PyTorch's additive float
convention). A query whose keys are all masked must produce a zero context
(the stock layer softmaxes ``finfo.min`` scores and then zeroes the weights), so
its output is ``linear_out.bias``. Kernels disagree on such rows (NaN before
torch 2.5, pytorch #103749/#109517; 0 since PR #133882; NaN on MPS, #156707), so
no kernel sees a row without a finite score: :func:`guard_empty_rows` lets those
rows attend everywhere (eager SDPA calls on CUDA get a finite additive mask
instead, :func:`espnet_mha.kernels.additive_mask`) and :func:`zero_empty_rows`
zeroes their context afterwards.
"""

import torch

from espnet_mha import checks

NO_MASK = "none"
KEY_PADDING = "key_padding"
PER_QUERY = "per_query"


def keep_mask(mask, *, batch, t1, t2, device):
    """Check an ESPnet mask and return it as a bool "keep" mask ``(b, m, T2)``.

    Args:
        mask: None, or a tensor of shape ``(b, m, n)`` with ``b`` in ``{1, B}``, ``m``
            in ``{1, T1}`` and ``n`` in ``{1, T2}``, or ``(1, n)``, or ``(m,)``; bool or
            numeric (complex too), nonzero = keep. These are the shapes the stock layer
            broadcasts (its ``mask.unsqueeze(1)`` against the ``(B, H, T1, T2)``
            scores): ``n = 1`` keeps or masks all keys of a row (a query-padding mask
            ``(B, T1, 1)``), ``(1, n)`` is one key mask for every item, and a 1-D
            ``(m,)`` becomes ``(m, 1)``, one flag per query row for every item. A 2-D
            ``(h, n)`` with ``h > 1`` is refused: the stock layer aligns ``h`` with the
            heads (a per-head mask), and such a mask is mostly a ``(B, T2)`` key mask
            that lacks its middle axis.
        batch, t1, t2: B, T1 and T2 of the attention call.
        device: the device of the query.

    Returns:
        None, or a bool tensor ``(b, m, T2)``, True where attention is allowed.

    Raises:
        TypeError: mask is not a tensor.
        ValueError: mask has another rank or does not broadcast to (B, T1, T2), or
            is on another device than the query.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    checks.check_dense("mask", mask)
    given = tuple(mask.shape)
    if mask.dim() == 1:  # (m,) -> (m, 1) by the stock unsqueeze: one flag per query row
        mask = mask.view(1, -1, 1)
    elif mask.dim() == 2 and mask.size(0) == 1:
        mask = mask.unsqueeze(0)
    elif mask.dim() == 2:
        raise ValueError(
            f"mask of shape {given}: a 2-D mask (h, T2) with h > 1 is a per-head mask to the "
            "stock layer (its mask.unsqueeze(1) aligns h with the heads), which this layer does not take; "
            "pass a key mask as (B, 1, T2), or (1, T2) for one mask for every item"
        )
    if mask.dim() != 3:
        raise ValueError(
            f"mask must be 3-D, (B, 1, T2) or (B, T1, T2) (or (1, T2), or (T1,)), got shape {given}"
        )
    b, m, n = mask.shape
    # Not `n not in (1, t2)`: Dynamo read `11 not in (1, 11)` as true for a dynamic t2
    # (torch 2.11; an audit, under a user's fullgraph compile).
    if (b != 1 and b != batch) or (m != 1 and m != t1) or (n != 1 and n != t2):
        raise ValueError(
            f"mask of shape {given} does not broadcast to "
            f"(B, T1, T2) = ({batch}, {t1}, {t2})"
        )
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but query is on {device}")
    keep = mask if mask.dtype == torch.bool else mask.ne(0)
    # (b, m, 1): one flag for all keys of a row, broadcast over the keys as by the stock layer.
    return keep if n == t2 else keep.expand(b, m, t2).contiguous()


def mask_kind(keep):
    """Classify a keep mask: ``NO_MASK``, ``KEY_PADDING`` (one row for all queries) or ``PER_QUERY``."""
    if keep is None:
        return NO_MASK
    return KEY_PADDING if keep.size(1) == 1 else PER_QUERY


def causal_keep(t1, t2, device):
    """Top-left aligned causal keep mask ``(1, T1, T2)``: query i sees keys j <= i."""
    return torch.ones(t1, t2, dtype=torch.bool, device=device).tril().unsqueeze(0)


def guard_empty_rows(keep):
    """Let fully masked query rows attend everywhere, so no kernel sees an empty row.

    Args:
        keep: bool ``(b, m, T2)``.

    Returns:
        (keep_safe, rows_ok): ``keep`` with empty rows set to all True, and the
        bool ``(b, m, 1)`` marker of rows that had at least one key.
    """
    rows_ok = keep.any(dim=-1, keepdim=True)
    return keep | ~rows_ok, rows_ok


def zero_empty_rows(context, rows_ok):
    """Zero the context ``(B, T1, D)`` of rows whose keys were all masked (stock semantics)."""
    if rows_ok is None:
        return context
    return torch.where(rows_ok, context, 0.0)  # one kernel; masked_fill(~rows_ok) takes two
