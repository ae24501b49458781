"""Backend selection per layer: the memoised choice of kernel for each kind of call,
the fallback logged once, and what the last call ran on.

A mixin of :class:`espnet_mha.layer.FlashMultiHeadedAttention`; the rules
themselves are pure functions in :mod:`espnet_mha.dispatch`.
"""

import logging

import torch

from espnet_mha import checks, compile_policy, dispatch, masks


FALLBACK_LINE = "espnet_mha: using %s instead of flash_attn: %s"


def _no_dropout_p():
    return 0.0


class BackendSelection:
    """Mixin for :class:`espnet_mha.layer.FlashMultiHeadedAttention` (needs the layer's
    ``d_k``, ``backend``, ``compile_setting``, ``_dropout_p``, ``_qkv_modules`` and the
    per-layer records ``_decisions`` and ``_last``)."""

    def _select(self, x, keep, *, causal, need_weights, shared_step=False, empty=False, dropout_module="",
                source=None):
        # The decision depends only on static properties of the call, so it is
        # memoised per layer: decoding steps pay a dict lookup, not the rules.
        # SDPA's allowed kernels (torch.nn.attention.sdpa_kernel): None unless restricted.
        # A dropout module only the math path can call has no say (it may have no ``p``).
        kernels = dispatch.sdpa_kernels(_no_dropout_p if dropout_module else self._dropout_p)
        key = (x.device, checks.compute_dtype(x), masks.mask_kind(keep), causal, need_weights, shared_step,
               self.backend, self.compile_setting, empty, dropout_module, kernels, compile_policy.capturing(),
               checks.forward_ad_active(), self._attention_grad(x, source), torch.compiler.is_compiling())
        decision = self._decisions.get(key)
        if decision is None:
            device, dtype, mask_kind = key[:3]
            call = dispatch.AttentionCall(
                device=device, dtype=dtype, d_k=self.d_k, mask_kind=mask_kind, causal=causal,
                need_weights=need_weights, shared_step=shared_step,
                # Compiled by the layer's policy, or traced by a user's torch.compile.
                compiled=compile_policy.wants_compile(self.compile_setting, device.type) or key[-1], empty=empty,
                dropout_module=dropout_module, sdpa_kernels=kernels, captured=key[-4], forward_ad=key[-3],
                grad=key[-2],
            )
            try:
                decision = self._decisions[key] = dispatch.select_backend(self.backend, call)
            except (dispatch.BackendUnavailableError, ValueError):
                self._last["backend"], self._last["fallback"] = None, ""  # this call ran on nothing
                raise
            backend, fallback = decision
            if fallback:
                # Logged once per layer and kind of call (the decision is remembered): on the
                # GPU, or where SDPA was refused (an sdpa_kernel restriction, a known bug); on
                # the CPU flash-attn never runs, which needs no line per layer at INFO.
                refusal = dispatch.sdpa_refusal(call)
                refused = backend == dispatch.MATH and refusal and refusal in fallback
                level = logging.INFO if device.type == "cuda" or refused else logging.DEBUG
                # Under a user's torch.compile too (a probe found the float64 switch to math
                # there logged nowhere).
                compile_policy.log(__name__, level, FALLBACK_LINE, backend, fallback)
        self._last["backend"], self._last["fallback"] = decision
        return decision

    def _attention_grad(self, x, source):
        """Whether the attention's backward may run: gradients are on and the query, the
        memory (or cache) ``source`` or a q/k/v projection parameter requires them (not
        only ``linear_out``'s, whose gradient needs no attention backward)."""
        if not torch.is_grad_enabled():
            return False
        if x.requires_grad or (source is not None and source.requires_grad):
            return True
        return any(p.requires_grad for module in self._qkv_modules() for p in module.parameters())

    @property
    def last_backend(self):
        """The backend the last call ran on (None before the first call)."""
        return self._last["backend"]

    @property
    def last_fallback(self):
        """Why the last call did not run on flash-attn ("" if it did, or was not asked to)."""
        return self._last["fallback"]
