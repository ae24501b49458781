"""``FlashMultiHeadedAttention``: a drop-in for ESPnet's state-space ``MultiHeadedAttention``."""

import logging
import math

import torch
from torch import nn

from espnet2.asr.state_spaces.base import SequenceModule

from espnet_mha import cache, checks, compile_policy, dispatch, functional, masks, packing, quantized, state_dict
from espnet_mha.stock_helpers import StockHelpers

logger = logging.getLogger(__name__)

# Call signatures of cached decoding steps remembered per layer (one per memory
# length and beam size in practice); the memo is emptied when it reaches this.
_MAX_CHECKED_STEPS = 256


class FlashMultiHeadedAttention(StockHelpers, SequenceModule):
    """Multi-head attention with the stock ESPnet interface, fused and cached.

    Computes what ``espnet2.asr.state_spaces.attention.MultiHeadedAttention``
    computes (same constructor, ``forward``/``step`` signatures, mask semantics
    and fully masked rows), with one fused q/k/v projection, attention through
    flash-attn or PyTorch SDPA (see :mod:`espnet_mha.dispatch`), and a
    key/value cache for ``step`` carried in the decoding state.

    Args:
        n_feat: D, the feature size (ESPnet passes the model's ``d_model``).
        n_head: H; ``n_feat`` must be divisible by it.
        dropout: dropout on the attention weights in training.
        transposed: query and output are ``(B, D, T)`` (``SequenceModel(transposed=True)``);
            ``memory`` stays ``(B, T2, D)``.
        causal: make this a causal *self*-attention layer: ``forward`` attends
            over the query with a causal mask (combined with a mask given
            without memory) and ``step`` keeps a growing cache. ``memory`` and the
            mask that comes with it, which ``SequenceModel`` passes to every
            layer, are ignored in this mode.
        keep_attn: keep the attention weights in ``self.attn`` like the stock
            layer (runs the explicit math path). Off by default: the
            ``(B, H, T1, T2)`` weights are then never materialised.
        backend: "auto" (default), "flash_attn", "sdpa" or "math";
            ``$ESPNET_MHA_BACKEND`` overrides it.
        compile: True, False or "auto" (default); ``$ESPNET_MHA_COMPILE`` overrides it.
        compile_mode: a ``torch.compile`` mode; ``$ESPNET_MHA_COMPILE_MODE`` overrides it.
        **kwargs: ignored, as by the stock layer (logged).

    Attributes:
        h, d_k, n_feat: heads, head size, features (stock names).
        linear_qkv: fused ``nn.Linear(D, 3D)``, rows q, k, v.
        linear_out: ``nn.Linear(D, D)``.
        attn: the last attention weights when ``keep_attn=True``, else None.
        last_backend: the backend the last call ran on.
        last_fallback: why the last call did not use flash-attn ("" if it did
            or it was not asked to).
        last_cache: what the last cross-attention ``step`` did with its state.

    Raises:
        TypeError, ValueError: bad sizes or options (see messages).
    """

    def __init__(self, n_feat, n_head, dropout=0.0, transposed=False, *, causal=False,
                 keep_attn=False, backend=None, compile=None, compile_mode=None, **kwargs):
        super().__init__()
        checks.check_size("n_feat", n_feat)
        checks.check_size("n_head", n_head)
        if n_feat % n_head:
            raise ValueError(f"n_feat ({n_feat}) must be divisible by n_head ({n_head})")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if kwargs:
            logger.warning("FlashMultiHeadedAttention ignores %s (as the stock layer does)", sorted(kwargs))
        self.n_feat = n_feat
        self.h = n_head
        self.d_k = n_feat // n_head
        self.d_model = n_feat
        self.d_output = n_feat
        self.transposed = bool(transposed)
        self.causal = bool(causal)
        self.keep_attn = bool(keep_attn)
        self.backend = dispatch.resolve_backend(backend)
        self.compile_setting, self.compile_mode = compile_policy.resolve_compile(compile, compile_mode)
        # skip_init: no random draws here, _reset_qkv draws them in the stock order.
        self.linear_qkv = torch.nn.utils.skip_init(nn.Linear, n_feat, 3 * n_feat, device=torch.get_default_device())
        self._reset_qkv()
        # Unregistered: after quantize_dynamic swaps linear_qkv, its float weights
        # re-quantize q, k and v separately, as the stock layer's (see espnet_mha.quantized).
        object.__setattr__(self, "_float_linear_qkv", self.linear_qkv)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.dropout = nn.Dropout(p=dropout)
        self.attn = None
        self._decisions = {}
        self._checked_steps = {}
        self._query_views = None
        self._cache_sources = {}  # cache storage -> cache.record of the memory and weights it holds
        # A plain dict, updated in place: nn.Module.__setattr__ is slow on the hot path.
        self._last = {"backend": None, "fallback": "", "skipped_keys": 0.0, "cache": None}
        self.register_load_state_dict_pre_hook(state_dict.load_state_dict_pre_hook)

    def _reset_qkv(self):
        # Initialise q, k, v exactly as three stock nn.Linear(D, D) would, in the
        # stock order, so the same seed gives the same weights as the stock layer.
        # linear_out is created right after, as the fourth stock linear.
        bound = 1.0 / math.sqrt(self.n_feat)
        with torch.no_grad():
            for weight, bias in zip(self.linear_qkv.weight.chunk(3), self.linear_qkv.bias.chunk(3)):
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                nn.init.uniform_(bias, -bound, bound)

    def extra_repr(self):
        return (f"n_feat={self.n_feat}, n_head={self.h}, causal={self.causal}, "
                f"backend={self.backend!r}, compile={self.compile_setting!r}")

    # ------------------------------------------------------------------ checks
    def _check_features(self, name, x, ndim, layout):
        weight = self._modules["linear_out"]._parameters.get("weight")
        if weight is None or not quantized.is_plain(self._modules["linear_qkv"]):
            weight = quantized.projections(self).reference
        checks.check_features(name, x, ndim, layout, n_feat=self.n_feat, weight=weight)

    def _check_memory(self, query, memory):
        # Device and dtype: both tensors were checked against the parameters.
        self._check_features("memory", memory, 3, "(B, T2, D)")
        checks.check_same_batch(query, memory)

    # ---------------------------------------------------------------- dispatch
    def _select(self, x, keep, *, causal, need_weights, decode_step=False):
        # The decision depends only on static properties of the call, so it is
        # memoised per layer: decoding steps pay a dict lookup, not the rules.
        key = (x.device, checks.compute_dtype(x), masks.mask_kind(keep), causal, need_weights, decode_step,
               self.backend, self.compile_setting)
        decision = self._decisions.get(key)
        if decision is None:
            device, dtype, mask_kind = key[:3]
            call = dispatch.AttentionCall(
                device=device, dtype=dtype, d_k=self.d_k, mask_kind=mask_kind, causal=causal,
                need_weights=need_weights, decode_step=decode_step,
                compiled=compile_policy.wants_compile(self.compile_setting, device.type),
            )
            decision = self._decisions[key] = dispatch.select_backend(self.backend, call)
            backend, fallback = decision
            if fallback and device.type == "cuda":
                logger.info("espnet_mha: using %s instead of flash_attn: %s", backend, fallback)
        self._last["backend"], self._last["fallback"] = decision
        return decision[0]

    @property
    def last_backend(self):
        """The backend the last call ran on (None before the first call)."""
        return self._last["backend"]

    @property
    def last_fallback(self):
        """Why the last call did not run on flash-attn ("" if it did, or was not asked to)."""
        return self._last["fallback"]

    @property
    def last_cache(self):
        """What the last cross-attention ``step`` did with the key/value cache: "filled"
        (``state=None``), "reused", or "recomputed: <why>" (the state was made from
        another memory, see :mod:`espnet_mha.cache`); None before the first."""
        return self._last["cache"]

    @property
    def last_skipped_keys(self):
        """Share of the key rows the last ``forward`` skipped as padding (0.0 if
        none; see :mod:`espnet_mha.packing`)."""
        return self._last["skipped_keys"]

    def _fn(self, fn, x):
        return compile_policy.pick(fn, self.compile_setting, self.compile_mode, x.device.type)

    def _params(self):
        # Plain dict lookups: nn.Module.__getattr__ costs about a microsecond per
        # hop, which adds up on the decoding hot path (one call per layer and step).
        qkv, out = self._modules["linear_qkv"]._parameters, self._modules["linear_out"]._parameters
        return qkv["weight"], qkv["bias"], out["weight"], out["bias"]

    # ------------------------------------------------------------------ public
    def forward(self, query, memory=None, mask=None, *args, **kwargs):
        """Scaled dot-product attention (cross-attention to ``memory``, or self-attention).

        Args:
            query: ``(B, T1, D)``, or ``(B, D, T1)`` when ``transposed``.
            memory: ``(B, T2, D)``; None for self-attention. Ignored when ``causal``.
            mask: ``(B or 1, 1, T2)`` or ``(B or 1, T1, T2)``, bool or numeric,
                nonzero = keep. Ignored when ``causal`` and ``memory`` is given.
            *args, **kwargs: ignored (``SequenceModel`` passes ``state=``, ``lengths=``).

        Returns:
            (output with the query's layout, None).

        Raises:
            TypeError, ValueError: bad shapes, dtypes or devices (before any kernel runs).
            dispatch.BackendUnavailableError: a forced backend cannot serve the call.
        """
        if isinstance(query, torch.Tensor) and query.dim() == 3 and self.transposed:
            query = query.transpose(1, 2)
        out = self._sequence(query, memory, mask)
        return (out.transpose(1, 2) if self.transposed else out), None

    def _sequence(self, query, memory, mask):
        self._check_features("query", query, 3, "(B, T1, D)")
        if self.causal and memory is not None:
            memory, mask = None, None
        if memory is not None:
            self._check_memory(query, memory)
        batch, t1, _ = query.shape
        t2 = t1 if memory is None else memory.size(1)
        keep = masks.keep_mask(mask, batch=batch, t1=t1, t2=t2, device=query.device)
        backend = self._select(query, keep, causal=self.causal, need_weights=self.keep_attn)
        proj = quantized.projections(self)
        key_lengths = None
        if proj is not None:  # swapped (quantized) linears: called as modules, eager
            out, weights = quantized.attend(
                proj, query, memory, keep, n_head=self.h, causal=self.causal,
                dropout_p=self._dropout_p(), training=self.training, backend=backend,
            )
        else:
            fn = self._fn(functional.attend, query)
            if (backend == dispatch.SDPA and not self.causal and query.device.type == "cpu"
                    and fn is functional.attend and not torch.compiler.is_compiling()):
                key_lengths = packing.plan(keep, batch=batch, t1=t1, t2=t2, d=self.n_feat)
            out, weights = fn(
                query, memory, keep, *self._params(), n_head=self.h, causal=self.causal,
                dropout_p=self._dropout_p(), training=self.training, backend=backend,
                key_lengths=key_lengths,
            )
        self._last["skipped_keys"] = 0.0 if key_lengths is None else 1.0 - sum(key_lengths) / (batch * t2)
        if self.keep_attn:
            self.attn = weights
        return out

    def step(self, query, state, memory=None, mask=None, **kwargs):
        """One decoding step.

        Args:
            query: ``(B, D)``, the newest position of every hypothesis.
            state: None (start of an utterance) or what the previous step returned
                (possibly split per hypothesis and given back with batch 1). A
                cross-attention state made from another memory (a streaming
                search's grown or moved encoder output) is recomputed from
                ``memory``; ``last_cache`` says so.
            memory: ``(B, T2, D)`` encoder output, possibly expanded with stride 0
                over the beam; None for self-attention.
            mask: ``(B or 1, 1, T2)`` over the memory (or over the cached positions
                when ``causal``), nonzero = keep.

        Returns:
            (output ``(B, D)``, state). With ``memory``: the memory projected to
            keys and values, ``(B, 2, H, T2, d_k)`` (a view of one
            ``(1, 2, H, T2, d_k)`` projection when the memory is shared).
            With ``causal``: the grown self-attention cache. Otherwise (stock
            behaviour: the token attends to itself only) ``state`` unchanged.

        Raises:
            TypeError, ValueError: bad shapes, or a malformed state (see :mod:`espnet_mha.cache`).
        """
        if mask is None and state is not None and memory is not None:
            fast = self._checked_cached_step(query, state, memory)
            if fast is not None:
                return fast
        self._check_features("query", query, 2, "(B, D)")
        batch = query.size(0)
        if self.causal:
            return self._step_self(query, state, mask)
        if memory is None:
            return self._sequence(query.unsqueeze(1), None, mask).squeeze(1), state
        self._check_memory(query, memory)
        proj = quantized.projections(self)
        params = self._params() if proj is None else None
        # One memory key for the checks and the record (a record is not made while tracing).
        key = None if state is None and torch.compiler.is_compiling() else cache.memory_key(memory)
        stale = "" if state is None else (
            cache.stale_reason(state, memory, key, batch=batch, n_head=self.h, dtype=checks.compute_dtype(memory))
            or self._provenance_problem(state, memory, key))
        if state is None or stale:
            kv = (functional.project_memory(memory, params[0], params[1], self.h) if proj is None
                  else quantized.project_memory(proj, memory, self.h))
            self._last["cache"] = f"recomputed: {stale}" if stale else "filled"
            if stale:
                logger.debug("espnet_mha: cross-attention cache recomputed: %s", stale)
        else:
            kv = state
            self._last["cache"] = "reused"
        self._remember_source(kv, memory, key)
        keep = masks.keep_mask(mask, batch=batch, t1=1, t2=memory.size(1), device=query.device)
        keep_call = None if keep is None else (keep.transpose(0, 1) if kv.size(0) == 1 else keep)
        backend = self._select(query, keep_call, causal=False, need_weights=self.keep_attn, decode_step=True)
        if proj is not None:
            out, weights = quantized.attend_cached(proj, query, kv, keep, backend=backend,
                                                   dropout_p=self._dropout_p())
        else:
            out, weights = self._fn(functional.attend_cached, query)(
                query, kv, keep, *functional.query_head_weights(params[0], params[1], self.h), params[2], params[3],
                backend=backend, dropout_p=self._dropout_p(), need_weights=self.keep_attn,
            )
        if self.keep_attn:
            self.attn = weights
        elif state is kv and keep is None and proj is None:
            key = self._cached_step_key(query, state, memory)
            # A key holds the device and the compile setting, so a call that compiles
            # is never remembered and the hot path need not ask again.
            if key is not None and not compile_policy.wants_compile(self.compile_setting, query.device.type):
                if len(self._checked_steps) >= _MAX_CHECKED_STEPS:
                    self._checked_steps.clear()
                self._checked_steps[key] = (self._last["backend"], self._last["fallback"])
        return out, cache.batch_state(kv, batch)

    def _dropout_p(self):
        """Attention dropout of a call: the layer's ``p`` in training, 0 in eval (for
        ``step`` too: the stock ``step`` runs ``forward``)."""
        return self.dropout.p if self.training else 0.0

    def _cached_step_key(self, query, state, memory):
        """What the checks of a cached cross-attention step depend on (None where the
        fast path does not apply: subclassed tensors, autocast, tracing, dropout).
        Every call of a decoding step makes one, so it is kept to plain lookups."""
        if (type(query) is not torch.Tensor or type(state) is not torch.Tensor or type(memory) is not torch.Tensor
                or self.causal or self.keep_attn or (self.training and self._modules["dropout"].p > 0)
                or torch._C._is_any_autocast_enabled() or torch.compiler.is_compiling()):
            return None
        return (query.shape, memory.shape, state.shape, query.dtype, memory.dtype, state.dtype,
                query.device, memory.device, state.device, self.backend, self.compile_setting,
                torch.is_grad_enabled(), state.is_inference())

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
        key = cache.memory_key(memory)
        if cache.provenance_problem(self._cache_sources.get(cache.source_slot(state)), key, memory,
                                    self._weights_key()) or cache.batch1_meets_distinct(state, key):
            return None  # the checked path decides: recompute, or reuse and remember
        self._last["backend"], self._last["fallback"] = decision
        try:
            params = self._decoding_params()
        except KeyError:  # the linears were swapped (quantize_dynamic): the checked path handles it
            return None
        self._last["cache"] = "reused"
        out, _ = functional.attend_cached(query, state, None, *params, backend=decision[0], need_weights=False)
        return out, cache.batch_state(state, query.size(0))

    def _weights_key(self):
        params = self._modules["linear_qkv"]._parameters
        return cache.weights_key(params.get("weight"), params.get("bias"))

    def _provenance_problem(self, state, memory, key):
        """Why ``state`` was not made by this layer from ``memory`` (whose
        :func:`cache.memory_key` is ``key``) with its current weights ("" if it was,
        or when tracing, where nothing can be looked up)."""
        if torch.compiler.is_compiling():
            return ""
        return cache.provenance_problem(self._cache_sources.get(cache.source_slot(state)), key, memory,
                                        self._weights_key())

    def _remember_source(self, kv, memory, key):
        """Remember what the cache ``kv`` was made from (up to ``cache.MAX_SOURCES`` caches)."""
        if torch.compiler.is_compiling():
            return
        slot = cache.source_slot(kv)
        if slot not in self._cache_sources and len(self._cache_sources) >= cache.MAX_SOURCES:
            # clear(), not evicting the oldest: atomic when threads share the layer. Caches
            # forgotten here are recomputed on their next step.
            self._cache_sources.clear()
        self._cache_sources[slot] = cache.record(memory, key, self._weights_key())

    def __getstate__(self):
        # Cache records hold weak references, which do not pickle; a copy of the layer
        # knows none of the caches (they are recomputed if given to it).
        state = self.__dict__.copy()
        state["_cache_sources"] = {}
        return state

    def _decoding_params(self):
        """(w_q_heads, b_q_heads, w_out, b_out) for cached steps (see
        :func:`functional.query_head_weights`).

        Without gradients the per-head query views are remembered while the
        parameters are the same tensors on the same storage (in-place updates
        such as ``load_state_dict`` or an optimizer step show through a view;
        ``.to()`` or ``param.data = ...`` make new storage and new views).
        Made and used only with gradients off, so no view can cut a gradient
        path."""
        w_qkv, b_qkv, w_out, b_out = self._params()
        if torch.is_grad_enabled():
            return (*functional.query_head_weights(w_qkv, b_qkv, self.h), w_out, b_out)
        views = self._query_views
        if views is None or views[0] is not w_qkv or views[1] is not b_qkv or views[2] != w_qkv.data_ptr() \
                or views[3] != b_qkv.data_ptr():
            views = self._query_views = (w_qkv, b_qkv, w_qkv.data_ptr(), b_qkv.data_ptr(),
                                         *functional.query_head_weights(w_qkv, b_qkv, self.h))
        return views[4], views[5], w_out, b_out

    def _step_self(self, query, state, mask):
        if quantized.projections(self) is not None:
            raise NotImplementedError(
                "step() of a causal layer with quantized linears is not supported; forward() is")
        batch = query.size(0)
        if state is not None:
            cache.check_self_cache(state, batch=batch, n_head=self.h, d_k=self.d_k,
                                   dtype=checks.compute_dtype(query), device=query.device)
        t2 = 1 if state is None else state.size(3) + 1
        keep = masks.keep_mask(mask, batch=batch, t1=1, t2=t2, device=query.device)
        backend = self._select(query, keep, causal=False, need_weights=self.keep_attn, decode_step=True)
        out, new_state, weights = self._fn(functional.step_self, query)(
            query, state, keep, *self._params(), n_head=self.h, backend=backend, dropout_p=self._dropout_p(),
        )
        if self.keep_attn:
            self.attn = weights
        return out, new_state

    def default_state(self, *batch_shape, device=None):
        """The state at the start of an utterance: None (the cache is made on the first step)."""
        return None
