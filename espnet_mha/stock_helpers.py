"""The stock layer's helper methods, ``forward_qkv`` and ``forward_attention``, and the
attention dropout.

ESPnet code and user code sometimes call the helpers directly (e.g. to inspect
attention), so our layer keeps them, computing exactly what the stock ones do
on our fused parameters. The layer's own ``forward`` uses them only when it must
call a replaced or hooked dropout module, as the stock layer does (the stock
path, :meth:`StockHelpers._stock_sequence`); otherwise the kernels apply the
dropout module's ``p`` while the module is in training mode.
"""

import math

import torch
from torch import nn

from espnet_mha import checks, kernels, masks, quantized


class StockHelpers:
    """Mixin for :class:`espnet_mha.layer.FlashMultiHeadedAttention` (needs ``_qkv_rows``,
    ``linear_out``, ``dropout``, ``h``, ``d_k`` and ``attn``)."""

    def forward_qkv(self, query, key, value):
        """Project and split heads, as the stock layer does.

        Args:
            query: ``(B, T1, D)``; key ``(B, T2, D)``, value ``(B, T2', D)`` (T2' may differ,
                as in the stock helper); each may be 2-D, read as the stock view reads it:
                a ``(B, D)`` query is one position; a 2-D key or value as in ``forward``
                (:func:`checks.one_frame`: ``(B, D)`` one position, ``(T2, D)`` for B = 1).

        Returns:
            q ``(B, H, T1, d_k)``, k ``(B, H, T2, d_k)``, v ``(B, H, T2', d_k)``.

        Raises:
            TypeError, ValueError: bad ranks, feature sizes, dtypes or devices, or
                key/value batches that are not the query's.
        """
        same_kv, kv_is_query = value is key, key is query
        given = []
        for name, x, layout in (("query", query, "(B, T1, D)"), ("key", key, "(B, T2, D)"), ("value", value, "(B, T2, D)")):
            if isinstance(x, torch.Tensor) and x.dim() == 2:  # as the stock view reads it
                self._check_features(name, x, 2, "(B, D)")
                if name == "query":
                    x = x.unsqueeze(1)
                else:
                    x = checks.one_frame(x, given[0].size(0))
                    checks.check_read_as_frames(name, x, given[0].size(0))
            else:
                self._check_features(name, x, 3, layout)
            given.append(x)
        query, key, value = given
        if key.size(0) != query.size(0) or value.size(0) != query.size(0):
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must both be (B, T2, D) "
                             f"with the query's batch B={query.size(0)}")
        n_batch = query.size(0)

        def heads(x):
            return x.view(n_batch, -1, self.h, self.d_k).transpose(1, 2)

        proj = quantized.projections(self)
        if proj is not None and proj.fused is not None:  # linear_qkv called as a module, once per input
            d = self.h * self.d_k
            q = proj.fused(query)
            kv = q if kv_is_query else proj.fused(key)
            v = kv if same_kv else proj.fused(value)
            return heads(q[..., :d]), heads(kv[..., d:2 * d]), heads(v[..., 2 * d:])
        if proj is not None:  # quantize_dynamic swapped the linears: re-quantized parts
            return heads(proj.q(query)), heads(proj.k(key)), heads(proj.v(value))
        (w_q, b_q), (w_k, b_k), (w_v, b_v) = self._qkv_rows()
        linear = nn.functional.linear
        return heads(linear(query, w_q, b_q)), heads(linear(key, w_k, b_k)), heads(linear(value, w_v, b_v))

    def forward_attention(self, value, scores, mask):
        """Attention context from scores, as the stock layer computes it.

        Stores the weights in ``self.attn`` (as the stock helper does).

        Args:
            value: ``(B, H, T2, d_k)``.
            scores: ``(B or 1, H, T1, T2)`` (batch 1: the same scores for every item, as the
                stock helper's ``matmul`` broadcasts them).
            mask: None, ``(B, 1, T2)`` or ``(B, T1, T2)``, nonzero = keep.

        Returns:
            ``(B, T1, D)``.

        Raises:
            TypeError, ValueError: value or scores are not 4-D tensors of fitting
                shapes, or the mask does not broadcast to ``(B, T1, T2)``.
        """
        for name, x in (("value", value), ("scores", scores)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a 4-D torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4:  # ValueError, as forward's rank checks (a probe)
                raise ValueError(f"{name} must be a 4-D torch.Tensor, got shape {tuple(x.shape)}")
        batch = value.size(0)
        _, n_head, t1, t2 = scores.shape
        wrong_batch = scores.size(0) != 1 and scores.size(0) != batch  # not `in (1, batch)`: see masks.keep_mask
        if wrong_batch or value.shape[1:] != (n_head, t2, self.d_k) or n_head != self.h:
            raise ValueError(f"value {tuple(value.shape)} and scores {tuple(scores.shape)} must be "
                             f"(B, H, T2, d_k) and (B or 1, H, T1, T2) with H={self.h}, d_k={self.d_k}")
        keep = masks.keep_mask(mask, batch=batch, t1=t1, t2=t2, device=scores.device)
        self.attn = kernels.stock_weights(scores, keep)
        x = torch.matmul(self.dropout(self.attn), value)
        x = x.transpose(1, 2).reshape(value.size(0), -1, self.h * self.d_k)
        return self.linear_out(x)

    def _dropout_p(self):
        """Attention dropout of a call: the dropout module's ``p`` while *it* is in training
        mode, else 0 (the stock layer calls ``self.dropout(...)``, so the module's own flag
        decides, e.g. MC dropout in eval or dropout switched off for training; for
        ``step`` too: the stock ``step`` runs ``forward``). Only for a plain
        ``nn.Dropout`` (see :meth:`_custom_dropout`)."""
        dropout = self._modules["dropout"]
        p = dropout.p
        if not 0.0 <= p <= 1.0:  # set after construction; F.dropout refuses it in the stock layer, eval too
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p} (the layer's dropout.p)")
        return p if dropout.training else 0.0

    def _custom_dropout(self):
        """The dropout module when the kernels cannot stand in for it, else None: when it
        is not a plain ``nn.Dropout`` (a user's replacement or subclass, a ``forward``
        set on the instance), has hooks of its own (forward or backward; global module
        hooks are not looked at, as for the linears), or is ``inplace`` (the stock
        layer's ``self.attn`` then holds the dropped weights). The layer then calls it
        on the attention weights, as the stock layer does, on the math path
        (:meth:`_stock_sequence`)."""
        dropout = self._modules["dropout"]
        if (type(dropout) is nn.Dropout and not dropout.inplace and "forward" not in dropout.__dict__
                and not (dropout._forward_hooks or dropout._forward_pre_hooks or dropout._backward_hooks
                         or dropout._backward_pre_hooks)):
            return None
        return dropout

    def _stock_sequence(self, query, memory, keep):
        """The stock computation through :meth:`forward_qkv` and :meth:`forward_attention`,
        which call the dropout module (and the linears, as modules where needed).

        Args:
            query: ``(B, T1, D)``; memory: ``(B, T2, D)`` or None (self-attention).
            keep: None or bool ``(b, m, T2)`` (not yet combined with ``causal``).
        """
        source = query if memory is None else memory
        self._select(query, keep, causal=self.causal, need_weights=self.keep_attn, source=memory,
                     empty=0 in (query.size(0), query.size(1), source.size(1)),
                     dropout_module=type(self._modules["dropout"]).__name__)
        if self.causal:
            causal = masks.causal_keep(query.size(1), source.size(1), query.device)
            keep = causal if keep is None else keep & causal
        q, k, v = self.forward_qkv(query, source, source)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_k)
        self._last["skipped_keys"] = 0.0
        return self.forward_attention(v, scores, keep)
