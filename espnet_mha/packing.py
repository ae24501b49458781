"""Skip padded keys on CPU: project and attend to the key rows some query can see.

ESPnet pads every batch to its longest utterance and masks the padding with
``(B, 1, T2)`` key-padding masks. The stock layer projects every padded row to
keys and values, scores it, and then zeroes its weight. When a good share of
the rows is padding, we instead (CPU, eager only):

run the key/value projection and attention per batch item, over its keys up
to the last one any query may see, so padded tails cost nothing (flash-attn's
"varlen" idea, done with one GEMM and one SDPA call per item; masked keys
inside that range stay masked). Items are split only when the skipped work
outweighs the extra calls (:func:`plan`).

Both compute the same function as the full call: a masked key's weight is
exactly zero either way, and so are its gradients. One difference: a NaN or
inf *in a masked row of the memory* no longer reaches the output (the stock
layer propagates it through ``0 * NaN``).

Not used on CUDA (choosing the rows needs the mask's values on the host, a
synchronisation; flash-attn's varlen path and SDPA's kernels handle padding
there), outside plain eager calls (:func:`espnet_mha.compile_policy.plain_eager`:
``torch.compile``, tracing and export, ``vmap``, ``make_fx``), when the attention weights are
requested, with dropout (per-item calls would draw other random numbers than
the stock layer), or for causal layers. ``$ESPNET_MHA_SKIP_PADDED_KEYS=0``
turns it off.
"""

import os

import torch
import torch.nn.functional as F

from espnet_mha import checks, dispatch

ENV_SKIP = "ESPNET_MHA_SKIP_PADDED_KEYS"
# Items are split only when the skipped keys save more than this per item. Per-item
# calls cost more than their call overhead: B small GEMMs and SDPA calls run less
# efficiently than one batched call. A 2-core AMD EPYC VM measured a loss at 4.4M
# skipped multiply-adds per item and gains from 7M; a 2-core Intel Xeon VM (48
# cross- and self-attention cases, inference and training, D 256/512, T2 100-600,
# 22% or 44% of the keys padding) lost up to 45% (0.55x) below 37M and gained in
# every case from 40M (1.01-1.63x). The higher bound: a lost gain is better than
# a slower call, and more cores favour the batched call further.
ITEM_COST_MACS = 40 << 20


def enabled():
    """Whether padded keys are skipped: ``$ESPNET_MHA_SKIP_PADDED_KEYS`` unset, empty or on
    (read at every call; values as for the other on/off variables, see :func:`checks.env_flag`).

    Raises:
        ValueError: the variable is neither on nor off (it read any other value, such as
            "disable" or "none", as on).
    """
    value = os.environ.get(ENV_SKIP, "")
    return not value.strip() or checks.env_flag(ENV_SKIP, value)


def plan(keep, *, batch, t1, t2, d):
    """Per-item key lengths for one CPU attention call, or None to run it batched.

    Args:
        keep: None or bool ``(b, m, T2)`` on the CPU, True = attend.
        batch, t1, t2, d: B, T1, T2 and D of the call.

    Returns:
        None, or B key counts: for each item, the keys up to its last visible
        one (at least 1), when skipping the rest saves more than the per-item
        calls cost.
    """
    if keep is None or not enabled() or keep.numel() == 0 or batch * t1 * t2 == 0:
        return None  # nothing to skip, or an empty call
    # A skipped key row saves its key/value projection and its scores and context.
    row_macs = 2 * d * d + 2 * t1 * d
    if (t2 - 1) * row_macs < ITEM_COST_MACS:
        return None  # not even skipping all but one key per item would pay: no need to read the mask
    visible = keep.any(dim=1)  # (b, T2): some query may see the key
    positions = torch.arange(1, t2 + 1, device=keep.device)
    ends = torch.where(visible, positions, 0).amax(dim=1).clamp_(min=1).expand(batch).tolist()
    skipped_rows = batch * t2 - sum(ends)
    if skipped_rows * row_macs < batch * ITEM_COST_MACS:
        return None
    return tuple(ends)


def attend_per_item(backend, q, source, keep, w_kv, b_kv, lengths, *, n_head, dropout_p, training):
    """Keys/values and attention of each batch item over its leading keys only.

    Args:
        backend: a selected backend (SDPA on CPU).
        q: projected queries ``(B, H, T1, d_k)``.
        source: what keys and values are projected from, ``(B, T2, D)``.
        keep: None or bool ``(b, m, T2)`` (empty rows allowed).
        w_kv, b_kv: the key and value rows of the fused projection, ``(2D, D)``, ``(2D,)``.
        lengths: B key counts from :func:`plan`; keys past them are masked.

    Returns:
        Context ``(B, T1, D)`` with fully masked rows zeroed, as :func:`dispatch.run`.
    """
    contexts = []
    d_k = q.size(-1)
    # unbind, not indexing: the backward of B slices would zero-fill B full-size gradients.
    for i, (q_i, source_i, n) in enumerate(zip(q.unbind(0), source.unbind(0), lengths)):
        kv = F.linear(source_i[:n], w_kv, b_kv)  # (n, 2D)
        k, v = (x.view(1, n, n_head, d_k).transpose(1, 2) for x in kv.chunk(2, dim=-1))
        keep_i = None
        if keep is not None:
            keep_i = (keep[i:i + 1] if keep.size(0) > 1 else keep)[..., :n]
            if bool(keep_i.all()):  # plain key padding: every remaining key is visible
                keep_i = None
        context, _ = dispatch.run(backend, q_i.unsqueeze(0), k, v, keep_i, causal=False,
                                  dropout_p=dropout_p, training=training)
        contexts.append(context)
    return torch.cat(contexts)
