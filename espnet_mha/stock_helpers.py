"""The stock layer's helper methods, ``forward_qkv`` and ``forward_attention``.

ESPnet code and user code sometimes call them directly (e.g. to inspect
attention), so our layer keeps them, computing exactly what the stock ones do
on our fused parameters. The layer's own ``forward`` does not use them.
"""

import torch
from torch import nn

from espnet_mha import kernels, masks, quantized


class StockHelpers:
    """Mixin for :class:`espnet_mha.layer.FlashMultiHeadedAttention` (needs
    ``linear_qkv``, ``linear_out``, ``dropout``, ``h``, ``d_k`` and ``attn``)."""

    def forward_qkv(self, query, key, value):
        """Project and split heads, as the stock layer does.

        Args:
            query: ``(B, T1, D)``; key, value: ``(B, T2, D)``.

        Returns:
            q ``(B, H, T1, d_k)``, k ``(B, H, T2, d_k)``, v ``(B, H, T2, d_k)``.

        Raises:
            TypeError, ValueError: bad ranks, feature sizes, dtypes or devices, or
                key/value shapes that do not fit the query's batch.
        """
        for name, x, layout in (("query", query, "(B, T1, D)"), ("key", key, "(B, T2, D)"), ("value", value, "(B, T2, D)")):
            self._check_features(name, x, 3, layout)
        if key.shape != value.shape or key.size(0) != query.size(0):
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must both be (B, T2, D) "
                             f"with the query's batch B={query.size(0)}")
        n_batch = query.size(0)

        def heads(x):
            return x.view(n_batch, -1, self.h, self.d_k).transpose(1, 2)

        proj = quantized.projections(self)
        if proj is not None:  # quantize_dynamic swapped the linears
            return heads(proj.q(query)), heads(proj.k(key)), heads(proj.v(value))
        w_q, w_k, w_v = self.linear_qkv.weight.chunk(3)
        b_q, b_k, b_v = self.linear_qkv.bias.chunk(3)
        linear = nn.functional.linear
        return heads(linear(query, w_q, b_q)), heads(linear(key, w_k, b_k)), heads(linear(value, w_v, b_v))

    def forward_attention(self, value, scores, mask):
        """Attention context from scores, as the stock layer computes it.

        Stores the weights in ``self.attn`` (as the stock helper does).

        Args:
            value: ``(B, H, T2, d_k)``.
            scores: ``(B, H, T1, T2)``.
            mask: None, ``(B, 1, T2)`` or ``(B, T1, T2)``, nonzero = keep.

        Returns:
            ``(B, T1, D)``.

        Raises:
            TypeError, ValueError: value or scores are not 4-D tensors of fitting
                shapes, or the mask does not broadcast to ``(B, T1, T2)``.
        """
        for name, x in (("value", value), ("scores", scores)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise TypeError(f"{name} must be a 4-D torch.Tensor, got "
                                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        batch, n_head, t1, t2 = scores.shape
        if value.shape != (batch, n_head, t2, self.d_k) or n_head != self.h:
            raise ValueError(f"value {tuple(value.shape)} and scores {tuple(scores.shape)} must be "
                             f"(B, H, T2, d_k) and (B, H, T1, T2) with H={self.h}, d_k={self.d_k}")
        keep = masks.keep_mask(mask, batch=batch, t1=t1, t2=t2, device=scores.device)
        self.attn = kernels.stock_weights(scores, keep)
        x = torch.matmul(self.dropout(self.attn), value)
        x = x.transpose(1, 2).reshape(value.size(0), -1, self.h * self.d_k)
        return self.linear_out(x)
