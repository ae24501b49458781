"""A causal layer's decoding steps (``causal=True``, ``step`` with no memory): the growing
self-attention cache, carried in the state, so that N steps give what ``forward`` gives
over the N positions.

A mixin of :class:`espnet_mha.layer.FlashMultiHeadedAttention`, called by
:meth:`espnet_mha.decoding.DecodingSteps.step`; the math is
:func:`espnet_mha.functional.step_self`.
"""

import logging
import math

import torch

from espnet_mha import cache, checks, functional, masks, quantized

logger = logging.getLogger(__name__)


class CausalSteps:
    """Mixin for :class:`espnet_mha.layer.FlashMultiHeadedAttention`: ``_step_self`` (needs
    the layer's ``h``, ``d_k``, ``keep_attn``, ``_select``, ``_fn``, ``_params``,
    ``_dropout_p``, ``_custom_dropout``, ``_keep_weights``, the stock helpers and the
    flag ``_warned_one_history``)."""

    def _step_self(self, query, state, mask):
        batch = query.size(0)
        state = cache.own_batch(state, batch)
        if state is not None:
            checks.check_self_cache(state, batch=batch, n_head=self.h, d_k=self.d_k,
                                    dtype=checks.compute_dtype(query), device=query.device)
            if batch > 1 and state.size(0) == 1 and state.stride(0) != 0 \
                    and not getattr(self, "_warned_one_history", False) \
                    and state.untyped_storage().nbytes() >= 2 * state.numel() * state.element_size():
                self._warn_one_history(batch)  # one hypothesis' cache, split off a beam's
        t2 = 1 if state is None else state.size(3) + 1
        keep = masks.keep_mask(mask, batch=batch, t1=1, t2=t2, device=query.device)
        if self._custom_dropout() is not None:
            return self._step_self_stock(query, state, keep)
        # One hypothesis has one cache: GEMM-shaped as a shared beam step (see dispatch).
        backend, _ = self._select(query, keep, causal=False, need_weights=self.keep_attn, shared_step=batch == 1,
                                  empty=batch == 0, source=state)
        proj = quantized.projections(self)
        if proj is not None:
            out, new_state, weights = quantized.step_self(proj, query, state, keep, n_head=self.h, backend=backend,
                                                          dropout_p=self._dropout_p())
        else:
            out, new_state, weights = self._fn(functional.step_self, query)(
                query, state, keep, *self._params(), n_head=self.h, backend=backend, dropout_p=self._dropout_p(),
            )
        self._keep_weights(weights)
        return out, new_state

    def _warn_one_history(self, batch):
        """Warn (once per layer) that one hypothesis' cache, split off a cache of several,
        serves a beam: every query then attends to that hypothesis' history."""
        self._warned_one_history = True
        logger.warning(
            "espnet_mha: a causal step got the cache of one hypothesis of a beam (batch 1, split off a "
            "cache of several) for %d queries, so all %d attend to that hypothesis' history. ESPnet's "
            "S4Decoder.batch_score does this at beam size > 1 (it hands the first hypothesis' states to "
            "the whole beam, as it does for s4 layers): decoding with causal=True then differs from "
            "forward. espnet_mha.merge_beam_states() makes batch_score merge each hypothesis' own states "
            "(see README, 'Causal self-attention in a beam search').", batch, batch)

    def _step_self_stock(self, query, state, keep):
        """A causal step through the stock helpers, which call the dropout module (see
        :meth:`_stock_sequence`): (output ``(B, D)``, the grown cache)."""
        self._select(query, keep, causal=False, need_weights=self.keep_attn, empty=query.size(0) == 0,
                     dropout_module=type(self._modules["dropout"]).__name__, source=state)
        x = query.unsqueeze(1)
        q, k, v = self.forward_qkv(x, x, x)  # (B, H, 1, d_k) each
        new = torch.stack([k, v], dim=1)  # (B, 2, H, 1, d_k)
        if state is not None:
            new = torch.cat([state.expand(query.size(0), -1, -1, -1, -1), new], dim=3)
        scores = torch.matmul(q, new[:, 0].transpose(-2, -1)) / math.sqrt(self.d_k)
        return self.forward_attention(new[:, 1], scores, keep).squeeze(1), new
