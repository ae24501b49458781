"""``FlashMultiHeadedAttention``: a drop-in for ESPnet's state-space ``MultiHeadedAttention``."""

import copy
import logging

import torch
from torch import nn

from espnet2.asr.state_spaces.base import SequenceModule

from espnet_mha import (beam_states, checks, compile_policy, dispatch, freeze_targets, functional, init_param,
                        lora_targets, masks, optional, packing, quantized, state_dict)
from espnet_mha.backend_selection import BackendSelection
from espnet_mha.causal_steps import CausalSteps
from espnet_mha.decoding import DecodingSteps
from espnet_mha.layer_checks import LayerChecks
from espnet_mha.parameters import ParameterLayout
from espnet_mha.stock_helpers import StockHelpers

logger = logging.getLogger(__name__)

# Where our layer is imported, ESPnet's --init_param --ignore_init_mismatch must not drop a
# file's q/k/v keys in the other layout (see espnet_mha.init_param; the startup hook installs
# this too, for stock models; here for runs with the hook off). Its LoRA is wrapped when a
# layer is built (see __init__).
init_param.install()


class FlashMultiHeadedAttention(LayerChecks, ParameterLayout, StockHelpers, BackendSelection, DecodingSteps,
                                CausalSteps, SequenceModule):
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
        state_dict_layout: "fused" (default: one ``linear_qkv``) or "stock": the stock
            layer's own parameters, ``linear_q``/``linear_k``/``linear_v``, stacked
            into the fused projection at each call. Its ``state_dict()`` then loads
            into the stock layer as it is, and whatever selects parameters or
            modules by name or treats each ``nn.Linear`` as a unit (ESPnet's
            ``--freeze_param``, ``--init_param`` exclusions, LoRA
            ``target_modules``, per-parameter optimizers, ``model.apply`` inits)
            sees the stock layer. What the ``mha`` name builds under
            ``use_for_mha()``. Either layout loads the other's state dict.
        **kwargs: ignored, as by the stock layer (logged).

    Attributes:
        h, d_k, n_feat: heads, head size, features (stock names).
        linear_qkv: fused ``nn.Linear(D, 3D)``, rows q, k, v (``state_dict_layout="fused"``).
        linear_q, linear_k, linear_v: ``nn.Linear(D, D)`` each (``state_dict_layout="stock"``).
        linear_out: ``nn.Linear(D, D)``.
        attn: the last attention weights when ``keep_attn=True``, else None.
        last_backend: the backend the last call ran on.
        last_fallback: why the last call did not use flash-attn ("" if it did
            or it was not asked to).
        last_cache: what the last cross-attention ``step`` did with its state.

    Raises:
        TypeError, ValueError: bad sizes or options (see messages), or options that
            contradict each other (``keep_attn=True`` with a forced ``"sdpa"`` or
            ``"flash_attn"`` backend, which return no weights).
    """

    def __init__(self, n_feat, n_head, dropout=0.0, transposed=False, *, causal=False,
                 keep_attn=False, backend=None, compile=None, compile_mode=None, state_dict_layout="fused",
                 **kwargs):
        super().__init__()
        # ESPnet's LoRA and --freeze_param must not skip our fused layers without a word
        # (espnet_mha.lora_targets, freeze_targets); here, not at import: ESPnet may import
        # those modules after ours.
        lora_targets.install()
        freeze_targets.install()
        state_dict_layout = state_dict.resolve_layout(state_dict_layout)
        n_feat, n_head = checks.check_size("n_feat", n_feat), checks.check_size("n_head", n_head)
        if n_feat % n_head:
            raise ValueError(f"n_feat ({n_feat}) must be divisible by n_head ({n_head})")
        dropout = checks.check_probability("dropout", dropout)
        causal, keep_attn = checks.check_flag("causal", causal), checks.check_flag("keep_attn", keep_attn)
        # Read as a flag, not bool(): a YAML string "false" turned transposition on (a probe).
        transposed = checks.check_flag("transposed", transposed)
        if kwargs:
            logger.warning("FlashMultiHeadedAttention ignores %s (as the stock layer does)", sorted(kwargs))
        self.n_feat = n_feat
        self.h = n_head
        self.d_k = n_feat // n_head
        self.d_model = n_feat
        self.d_output = n_feat
        self.transposed = transposed
        self.causal = causal
        self.keep_attn = keep_attn
        self.backend = dispatch.resolve_backend(backend)
        if keep_attn and self.backend in (dispatch.SDPA, dispatch.FLASH_ATTN):
            # Every call would raise BackendUnavailableError; say so now (a probe).
            source = f" (from ${dispatch.ENV_BACKEND})" if self.backend != dispatch.check_backend(backend) else ""
            raise ValueError(f"keep_attn=True needs the attention weights, which only the math path returns; "
                             f"backend={self.backend!r}{source} cannot give them: use 'math' or 'auto'")
        self.compile_setting, self.compile_mode = compile_policy.resolve_compile(compile, compile_mode)
        self._make_projections(n_feat, state_dict_layout)
        self.dropout = nn.Dropout(p=dropout)
        self.attn = None
        self._decisions = {}
        self._checked_steps = {}
        self._query_views = None
        self._cache_sources = {}  # cache storage -> cache_records.record of the memory and weights it holds
        self._warned_one_history = False  # see CausalSteps._warn_one_history
        beam_states.apply_environment()  # a decoder is being built: S4Decoder is loaded
        # A plain dict, updated in place: nn.Module.__setattr__ is slow on the hot path.
        self._last = {"backend": None, "fallback": "", "skipped_keys": 0.0, "cache": None}
        # Probe flash-attn now, eagerly: a user's torch.compile(model, fullgraph=True) traces
        # backend selection and cannot trace the import (it then refused every call).
        optional.flash_attn()
        self.register_load_state_dict_pre_hook(state_dict.load_state_dict_pre_hook)

    def extra_repr(self):
        layout = "" if self.state_dict_layout == "fused" else f", state_dict_layout={self.state_dict_layout!r}"
        return (f"n_feat={self.n_feat}, n_head={self.h}, causal={self.causal}, "
                f"backend={self.backend!r}, compile={self.compile_setting!r}{layout}")

    @property
    def last_cache(self):
        """What the last cross-attention ``step`` did with the key/value cache: "filled"
        (``state=None``), "reused", or "recomputed: <why>" (the state was made from
        another memory, see :mod:`espnet_mha.cache`); None before the first, and after a
        step that used no cache (the stock step: a replaced dropout module, or a capture)."""
        return self._last["cache"]

    @property
    def last_skipped_keys(self):
        """Share of the key rows the last ``forward`` skipped as padding (0.0 if
        none; see :mod:`espnet_mha.packing`)."""
        return self._last["skipped_keys"]

    def _fn(self, fn, x):
        return compile_policy.pick(fn, self.compile_setting, self.compile_mode, x.device.type)

    # ------------------------------------------------------------------ public
    def forward(self, query, memory=None, mask=None, *args, **kwargs):
        """Scaled dot-product attention (cross-attention to ``memory``, or self-attention).

        Args:
            query: ``(B, T1, D)``, or ``(B, D, T1)`` when ``transposed``. A ``(B, D)``
                query is one position (output ``(B, 1, D)``), as the stock layer reads it.
            memory: ``(B, T2, D)`` (a 2-D memory as the stock layer reads it: ``(B, D)`` one frame
                per item, ``(T2, D)`` for a batch-1 query; see :func:`checks.one_frame`); None for
                self-attention. Ignored when ``causal``.
            mask: ``(B or 1, 1, T2)`` or ``(B or 1, T1, T2)``, bool or numeric,
                nonzero = keep. Ignored when ``causal`` and ``memory`` is given.
            *args, **kwargs: ignored (``SequenceModel`` passes ``state=``, ``lengths=``).

        Returns:
            (output with the query's layout, None).

        Raises:
            TypeError, ValueError: bad shapes, dtypes or devices (before any kernel runs).
            dispatch.BackendUnavailableError: a forced backend cannot serve the call.
        """
        # Until this call has run (it may raise); not dict.update, which torch 2.5's Dynamo cannot trace.
        self._last["backend"], self._last["fallback"] = None, ""
        if self.transposed:
            self._check_features("query", query, 3, "(B, D, T1) (transposed)", feature_dim=1)
            query = query.transpose(1, 2)
        elif isinstance(query, torch.Tensor) and query.dim() == 2:
            # (B, D): one position, (B, 1, D) out, as the stock layer reads it (also a sparse
            # one: its linears take that, and give dense projections).
            query = checks.dense_rows(query).unsqueeze(1)
        batch = query.size(0) if isinstance(query, torch.Tensor) and query.dim() else 0
        out = self._sequence(query, self._frames(memory, batch), mask)
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
        if self._custom_dropout() is not None:
            return self._stock_sequence(query, memory, keep)
        backend, _ = self._select(query, keep, causal=self.causal, need_weights=self.keep_attn,
                               empty=0 in (batch, t1, t2), source=memory)
        proj = quantized.projections(self)
        key_lengths = None
        if proj is not None:  # swapped (quantized) linears: called as modules, eager
            out, weights = quantized.attend(
                proj, query, memory, keep, n_head=self.h, causal=self.causal,
                dropout_p=self._dropout_p(), training=self._modules["dropout"].training, backend=backend,
            )
        else:
            fn = self._fn(functional.attend, query)
            # Per-item calls draw dropout in other shapes than the stock layer's one call,
            # so with dropout the batch runs whole (the same random numbers as stock).
            if (backend == dispatch.SDPA and not self.causal and query.device.type == "cpu"
                    and fn is functional.attend and not self._dropout_p() and compile_policy.plain_eager()):
                key_lengths = packing.plan(keep, batch=batch, t1=t1, t2=t2, d=self.n_feat)
            out, weights = fn(
                query, memory, keep, *self._params(), n_head=self.h, causal=self.causal,
                dropout_p=self._dropout_p(), training=self._modules["dropout"].training, backend=backend,
                key_lengths=key_lengths,
            )
        self._last["skipped_keys"] = 0.0 if key_lengths is None else 1.0 - sum(key_lengths) / (batch * t2)
        self._keep_weights(weights)
        return out

    def _keep_weights(self, weights):
        """``attn``: the call's attention weights while ``keep_attn`` is on, else None (also
        once ``keep_attn`` is switched off after a call that kept them)."""
        if self.keep_attn:
            self.attn = weights
        elif self.attn is not None:
            self.attn = None

    def _forget_records(self):
        """Drop what the layer remembers about its parameters and caches: the query views,
        the module projections, and the cache records (every cache made so far is
        recomputed on its next step). Called before the parameters are moved, cast or
        loaded, whose old storage need not stay alive for views nobody will use. None of
        these holds a parameter or weakly references one (``torch.utils.swap_tensors``
        refuses such a tensor), so a swap outside ``_apply`` (a user's, or a
        parametrization's under ``torch.__future__.set_swap_module_params_on_conversion``)
        works too; the records then see new storage and recompute."""
        self._query_views = None
        self._cache_sources.clear()
        self.__dict__.pop("_projections", None)

    def _apply(self, fn, *args, **kwargs):
        self._forget_records()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        """What ``pickle``, ``torch.save(model)`` and ``copy.deepcopy`` copy: no per-layer records.

        Cache records hold weak references, which do not pickle (a copy knows none of
        the caches, so they are recomputed if given to it); the remembered query views
        and module projections refer to this layer's modules, not the copy's (they are
        made again on first use). ``quantize_dynamic`` leaves its ``qconfig`` (a local
        function, which does not pickle) on the float ``linear_qkv`` it swapped out,
        which only this layer still holds: the copy's float module goes without it.
        """
        state = self.__dict__.copy()
        state.update(_cache_sources={}, _query_views=None)
        state.pop("_projections", None)
        float_qkv = state.get("_float_linear_qkv")
        if float_qkv is not None and float_qkv is not self._modules["linear_qkv"] and "qconfig" in float_qkv.__dict__:
            float_qkv = copy.copy(float_qkv)
            del float_qkv.__dict__["qconfig"]
            state["_float_linear_qkv"] = float_qkv
        return state


class StockLayoutFlashMultiHeadedAttention(FlashMultiHeadedAttention):
    """:class:`FlashMultiHeadedAttention` with the stock parameters (``linear_q/k/v``).

    What the plain ``mha`` name builds under ``use_for_mha()`` /
    ``ESPNET_MHA_REPLACE_MHA=1``: the config (and ESPnet's ``config.yaml``) then
    says ``mha``, so whoever loads the checkpoint may build the stock layer,
    and ESPnet's ``build_model_from_file`` loads with ``strict=False``: fused
    keys would be dropped without a word. And whatever in the config selects
    parameters by their stock names (``--freeze_param``, LoRA targets) finds
    them. Same arguments; ``state_dict_layout`` defaults to "stock". ``causal`` is
    ignored, with a warning: the stock layer drops it with its other unknown options
    (and stays cross-attention to the memory), so a config that says ``mha`` must compute
    the same with this layer (``flash_mha`` builds the causal layer).
    """

    def __init__(self, *args, state_dict_layout="stock", causal=False, **kwargs):
        # None (a YAML null) is this class's default, not the fused one (a review).
        state_dict_layout = state_dict.resolve_layout("stock" if state_dict_layout is None else state_dict_layout)
        try:
            asked = checks.check_flag("causal", causal)
        except TypeError:  # "yes", 2...: the stock layer drops it with its other unknown options too
            asked = True
        if asked:
            logger.warning("the mha name ignores causal: %r, as the stock layer does (it stays cross-attention "
                           "to the memory); use _name_: flash_mha for the causal layer", causal)
        if state_dict_layout == "fused":
            logger.warning("the mha name with state_dict_layout: fused writes fused checkpoints under a config "
                           "that says mha: whoever builds it with the stock layer loads them with strict=False "
                           "and drops linear_qkv (random q/k/v); use _name_: flash_mha for the fused layout")
        super().__init__(*args, state_dict_layout=state_dict_layout, **kwargs)
