"""The layer's decoding ``step``: the key/value cache of the encoder memory and its
checked hot path (a causal layer's steps are in :mod:`espnet_mha.causal_steps`).

A mixin of :class:`espnet_mha.layer.FlashMultiHeadedAttention`, kept apart so
that the layer's file holds construction, dispatch and ``forward``. The cache's
layout and the rules for reusing it are in :mod:`espnet_mha.cache`; the math is
in :mod:`espnet_mha.functional`.
"""

import logging

import torch

from espnet_mha import cache, cache_records, checks, compile_policy, dispatch, functional, masks, quantized

logger = logging.getLogger(__name__)

# Call signatures of cached decoding steps remembered per layer (one per memory
# length and beam size in practice); the memo is emptied when it reaches this.
_MAX_CHECKED_STEPS = 256


class DecodingSteps:
    """Mixin for :class:`espnet_mha.layer.FlashMultiHeadedAttention`: ``step`` and
    ``default_state`` (needs the layer's ``h``, ``causal``, ``keep_attn``, the parameter
    accessors of :class:`espnet_mha.parameters.ParameterLayout`, ``_select``,
    ``_sequence``, ``_fn``, ``_check_features``, ``_frames``, ``_check_memory`` (of
    :class:`espnet_mha.layer_checks.LayerChecks`), ``_step_self`` (of
    :class:`espnet_mha.causal_steps.CausalSteps`),
    ``_keep_weights``, and the per-layer records ``_checked_steps``, ``_cache_sources``,
    ``_query_views``, ``_last``)."""

    def step(self, query, state, memory=None, mask=None, **kwargs):
        """One decoding step.

        Args:
            query: ``(B, D)`` (or ``(B, 1, D)``), the newest position of every hypothesis.
            state: None (start of an utterance) or what the previous step returned
                (possibly split per hypothesis and given back with batch 1, or, for a
                shared cache, handed to a query batch of another size). A
                cross-attention state made from another memory (a streaming
                search's grown or moved encoder output) is recomputed from
                ``memory``; ``last_cache`` says so.
            memory: ``(B, T2, D)`` encoder output, possibly expanded with stride 0
                over the beam (a 2-D memory is read as the stock layer reads it, see
                :func:`checks.one_frame`); None for self-attention.
            mask: ``(B or 1, 1, T2)`` over the memory (or, when ``causal`` and
                ``memory`` is None, over the cached positions), nonzero = keep.

        Returns:
            (output ``(B, D)``, state). With ``memory``: the memory projected to
            keys and values, ``(B, 2, H, T2, d_k)`` (a view of one
            ``(1, 2, H, T2, d_k)`` projection when the memory is shared).
            With ``causal``: the grown self-attention cache. Otherwise (stock
            behaviour: the token attends to itself only) ``state`` unchanged.
            Also unchanged, computed as the stock step (no cache), while
            ``torch.jit.trace``/``torch.export`` capture the step, inside a
            forward-mode AD level, and when the layer's dropout module is
            replaced or hooked (see ``README``).

        Raises:
            TypeError, ValueError: bad shapes, or a malformed state (see :mod:`espnet_mha.cache`).
        """
        last = self._last  # until this call has run (it may raise); not dict.update, as in forward
        last["backend"], last["fallback"], last["cache"] = None, "", None
        if isinstance(query, torch.Tensor) and query.dim() == 3:  # a Parameter or subclass too, as stock
            checks.check_dense("query", query)
            if query.size(1) == 1:
                # (B, 1, D): the stock step takes it too, and returns (B, D). Checked before the
                # squeeze, so that an error names the shape given.
                self._check_features("query", query, 3, "(B, 1, D)")
                query = query.squeeze(1)
            elif not self.causal:  # the stock step is forward over all T1 positions: (B, T1, D)
                return self._stock_step(query, self._frames(memory, query.size(0)), mask), state
            else:
                raise ValueError(f"query of a causal step must be one position per hypothesis, (B, D) or "
                                 f"(B, 1, D), got {tuple(query.shape)}; forward takes several positions")
        if mask is None and state is not None and memory is not None:
            fast = self._checked_cached_step(query, state, memory)  # its signature holds the layout
            if fast is not None:
                return fast
        if isinstance(query, torch.Tensor) and query.dim() == 2:
            query = checks.dense_rows(query)  # the stock step takes a sparse (B, D) query
        if isinstance(query, torch.Tensor) and query.dim() != 2:  # 3-D ones went above
            raise ValueError(f"query of a step must be (B, D), (B, 1, D) or (B, T1, D), got shape {tuple(query.shape)}")
        self._check_features("query", query, 2, "(B, D)")
        memory = self._frames(memory, query.size(0))
        batch = query.size(0)
        if self.causal:
            # As forward: the encoder memory, and the mask that comes with it, are not ours.
            return self._step_self(query, state, mask if memory is None else None)
        if (memory is None or self._custom_dropout() is not None or compile_policy.capturing()
                or torch._C._are_functorch_transforms_active() or checks.forward_ad_active()
                or type(memory) is not torch.Tensor or self._kv_may_change()):
            # The stock step (forward over one position, the state passed through): for a
            # dropout module the layer must call; for a key/value projection that may
            # compute differently at each call, which the stock step calls at every step;
            # in a traced or exported graph, where the
            # cache's checks cannot run and its shortcuts (a stride-0 memory, a batch-1
            # state) would be frozen for every later input; and under torch.func
            # transforms or for tensor subclasses (wrappers such as TwoTensor, as the memory
            # or the key/value weights), whose tensors may have no storage for the cache's
            # records; and in forward-mode AD,
            # where a dual memory has the address and write counter of its primal (a cache
            # of the primal, or of another tangent, lost or misstated the tangent).
            return self._stock_step(query.unsqueeze(1), memory, mask).squeeze(1), state
        self._check_memory(query, memory)
        state = cache.own_batch(state, batch)
        # The mask as the kernel gets it: (1 or B, 1, T2) whether or not functional.cached_context
        # folds the beam (it folds only with a (1, 1, T2) mask, which folding leaves as it is).
        keep = masks.keep_mask(mask, batch=batch, t1=1, t2=memory.size(1), device=query.device)
        proj = quantized.projections(self)
        key, weights, stale = self._check_state(state, memory, batch)
        reuse = state is not None and not stale
        source = state if reuse else memory  # what the keys and values come from
        # Chosen (and refused, for a forced backend) before the memory is projected: the
        # cache of a batch-1 or stride-0 memory has batch 1, as a reused one may have.
        decision = self._select(query, keep, causal=False, need_weights=self.keep_attn,
                                shared_step=functional.shared_memory(source).size(0) == 1,
                                empty=0 in (batch, memory.size(1)), source=source)
        backend = decision[0]
        if reuse:
            kv = state
            self._last["cache"] = "reused"
        else:
            kv = (functional.project_memory(memory, *self._kv_params(), self.h) if proj is None
                  else quantized.project_memory(proj, memory, self.h))
            self._last["cache"] = f"recomputed: {stale}" if stale else "filled"
            if stale:
                logger.debug("espnet_mha: cross-attention cache recomputed: %s", stale)
        if proj is not None:
            out, attn = quantized.attend_cached(proj, query, kv, keep, backend=backend,
                                                dropout_p=self._dropout_p())
            # The called modules as this step leaves them: one that keeps its last input or
            # output changes that attribute at each call, which is no change of its weights
            # (keyed before the calls, the cache was recomputed at every step).
            weights = self._weights()
        else:
            out, attn = self._fn(functional.attend_cached, query)(
                query, kv, keep, *self._decoding_params(), backend=backend, dropout_p=self._dropout_p(),
                need_weights=self.keep_attn,
            )
        self._keep_weights(attn)
        if type(kv) is not torch.Tensor:
            # A called projection that returns a tensor subclass (an attribute of one, kernels
            # of its own): nothing to record of its storage (the step raised). Used for this
            # step only, the state passed through, as by the stock step.
            self._last["cache"] = None
            return out, state
        self._remember_source(kv, memory, key, weights, reused=kv is state)
        if not self.keep_attn and state is kv and keep is None and proj is None:
            key = self._cached_step_key(query, state, memory)
            # A key holds the device and the compile setting, so a call that compiles
            # is never remembered and the hot path need not ask again.
            if key is not None and not compile_policy.wants_compile(self.compile_setting, query.device.type):
                if len(self._checked_steps) >= _MAX_CHECKED_STEPS:
                    self._checked_steps.clear()
                # The decision of this call, not _last: another thread may have written it since.
                self._checked_steps[key] = decision
        return out, cache.batch_state(kv, batch)

    def _stock_step(self, query, memory, mask):
        """The stock step, ``forward`` over the query's ``(B, T1, D)`` positions, with no cache."""
        if memory is not None:
            self._last["cache"] = None
        return self._sequence(query, memory, mask)

    def _cached_step_key(self, query, state, memory):
        """What the checks of a cached cross-attention step depend on (None where the
        fast path does not apply: subclassed or nested tensors, autocast, tracing, dropout).
        Every call of a decoding step makes one, so it is kept to plain lookups."""
        if (type(query) is not torch.Tensor or type(state) is not torch.Tensor or type(memory) is not torch.Tensor
                or query.is_nested or memory.is_nested or state.is_nested
                or self.causal or self.keep_attn or self._custom_dropout() is not None or self._dropout_p() > 0
                or torch._C._is_any_autocast_enabled() or torch.compiler.is_compiling()
                or compile_policy.capturing() or torch._C._are_functorch_transforms_active()
                or checks.forward_ad_active()):
            return None
        # state.stride(0) == 0: a shared cache (expanded over the beam), which selects its own backend.
        # The layouts: a sparse query or memory of a remembered shape must meet the checks.
        # sdpa_kernels: a torch.nn.attention.sdpa_kernel restriction changes the backend, and so
        # may whether the attention's backward can follow (_select's key has both).
        grad = torch.is_grad_enabled()
        return (query.shape, memory.shape, state.shape, state.stride(0) == 0, state.layout, query.layout,
                memory.layout, query.dtype, memory.dtype, state.dtype, query.device, memory.device, state.device,
                self.backend, self.compile_setting, grad, state.is_inference(),
                None if torch._C._get_math_sdp_enabled() else dispatch.sdpa_kernels(self._dropout_p),
                grad and self._attention_grad(query, state))

    def _checked_cached_step(self, query, state, memory):
        """The decoding hot path: a cached cross-attention step (no mask) whose shapes,
        dtypes and devices already passed every check of ``step`` once on this layer.
        Those checks depend on nothing else, so they are skipped; the step computes
        exactly what the checked path computes. Returns None when the call has not
        been seen (it then takes the checked path, which records it)."""
        key = self._cached_step_key(query, state, memory)
        decision = None if key is None else self._checked_steps.get(key)
        if decision is None:
            return None
        # The signature covers shapes, dtypes and devices; what it leaves open is
        # whether the state was made from this very memory with these weights, and
        # whether a batch-1 state meets distinct memories.
        weights = self._plain_weights()
        if weights is None or not quantized.is_plain(self._modules["linear_out"]):
            return None  # linears called as modules (quantized, LoRA, hooks): the checked path does that
        key = cache.memory_key(memory)
        if cache_records.provenance_problem(self._cache_sources, state, key, memory, weights[0],
                                            cache_records.grad_flags(memory, weights[1])) \
                or cache.batch1_meets_distinct(state, key):
            return None  # the checked path decides: recompute, or reuse and remember
        self._last["backend"], self._last["fallback"] = decision
        self._keep_weights(None)  # keep_attn may have been switched off since the signature was remembered
        params = self._decoding_params()
        self._last["cache"] = "reused"
        out, _ = functional.attend_cached(query, state, None, *params, backend=decision[0], need_weights=False)
        return out, cache.batch_state(state, query.size(0))

    # The records of which memory and weights a cache holds live in Python dicts and
    # read addresses and write counters, which a trace cannot see: when a user compiles
    # the decoder's step (the layer's own compile policy compiles only the math), these
    # two run eagerly at a graph break. Skipping them while tracing reused a state made
    # from another memory of the same length (a streaming window).
    @torch.compiler.disable
    def _check_state(self, state, memory, batch):
        """(:func:`cache.memory_key` of ``memory``, :meth:`_weights`, why ``state`` cannot
        be reused for it: "" if it can, or if ``state`` is None). The memory key and the
        weights are handed on to :meth:`_remember_source`, so a step computes each once."""
        key, weights = cache.memory_key(memory), self._weights()
        if state is None:
            return key, weights, ""
        stale = cache.stale_reason(state, memory, key, batch=batch, n_head=self.h,
                                   dtype=checks.compute_dtype(memory))
        return key, weights, stale or cache_records.provenance_problem(
            self._cache_sources, state, key, memory, weights[0], cache_records.grad_flags(memory, weights[1]))

    @torch.compiler.disable
    def _remember_source(self, kv, memory, key, weights, reused):
        """Remember what the cache ``kv`` was made from (up to ``cache_records.MAX_SOURCES`` caches):
        the memory whose :func:`cache.memory_key` is ``key``, with the weights ``weights``
        (:meth:`_weights`; ``reused``: ``kv`` is the state the step was given, which keeps
        its graph)."""
        slot = cache_records.source_slot(kv)
        if slot not in self._cache_sources and len(self._cache_sources) >= cache_records.MAX_SOURCES:
            # clear(), not evicting the oldest: atomic when threads share the layer. Caches
            # forgotten here are recomputed on their next step.
            self._cache_sources.clear()
        previous = self._cache_sources.get(slot) if reused else None
        self._cache_sources[slot] = cache_records.record(memory, key, weights[0], kv, weights[1], previous)

    def _decoding_params(self):
        """(w_q_heads, b_q_heads, w_out, b_out) for cached steps (see
        :func:`functional.query_head_weights`).

        Without gradients the per-head query views are remembered while the
        parameters are the same tensors at the same address with the same strides
        (in-place updates such as ``load_state_dict`` or an optimizer step show
        through a view; ``.to()`` or ``param.data = ...`` make new storage, or, as
        ``weight.data = weight.data.t()`` on the stock layout's square ``linear_q``,
        other strides, and so new views; the views keep the old storage alive, so its
        address is not handed to new weights). Made and used only with gradients
        off, so no view can cut a gradient path."""
        w_qkv, b_qkv = self._query_projection()
        out = self._modules["linear_out"]._parameters
        w_out, b_out = out["weight"], out["bias"]
        if torch.is_grad_enabled():
            return (*functional.query_head_weights(w_qkv, b_qkv, self.h), w_out, b_out)
        views = self._query_views
        where = (w_qkv.data_ptr(), b_qkv.data_ptr(), w_qkv.stride(), b_qkv.stride())
        if views is None or views[0] is not w_qkv or views[1] is not b_qkv or views[2] != where:
            # Views of detached aliases: a view of the parameter itself would hold it (its base),
            # and torch.utils.swap_tensors refuses a parameter held elsewhere.
            views = self._query_views = (w_qkv, b_qkv, where,
                                         *functional.query_head_weights(w_qkv.detach(), b_qkv.detach(), self.h))
        return views[3], views[4], w_out, b_out

    def default_state(self, *batch_shape, device=None):
        """The state at the start of an utterance: None (the cache is made on the first step)."""
        return None
