"""The stock layer's helper methods, ``forward_qkv`` and ``forward_attention``.

ESPnet code and user code sometimes call them directly (e.g. to inspect
attention), so our layer keeps them, computing exactly what the stock ones do
on our fused parameters. The layer's own ``forward`` does not use them.
"""

import torch
from torch import nn

from espnet_mha import dispatch, quantized


class StockHelpers:
    """Mixin for :class:`espnet_mha.layer.FlashMultiHeadedAttention` (needs
    ``linear_qkv``, ``linear_out``, ``dropout``, ``h``, ``d_k`` and ``attn``)."""

    def forward_qkv(self, query, key, value):
        """Project and split heads, as the stock layer does.

        Args:
            query: ``(B, T1, D)``; key, value: ``(B, T2, D)``.

        Returns:
            q ``(B, H, T1, d_k)``, k ``(B, H, T2, d_k)``, v ``(B, H, T2, d_k)``.
        """
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
        """
        keep = None if mask is None else mask.ne(0)
        self.attn = dispatch.stock_weights(scores, keep)
        x = torch.matmul(self.dropout(self.attn), value)
        x = x.transpose(1, 2).reshape(value.size(0), -1, self.h * self.d_k)
        return self.linear_out(x)
