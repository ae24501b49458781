"""The layer's q/k/v parameters in either layout, and how the computation reads them.

``state_dict_layout="fused"`` (the default): one ``linear_qkv``, ``nn.Linear(D, 3D)``
with rows q, k, v, which the kernels read as one GEMM. ``"stock"``: the stock
layer's own ``linear_q``, ``linear_k``, ``linear_v``, stacked per call, so that
checkpoints and whatever selects parameters or modules by name see the stock
layer. Both are made so that the same seed gives the stock layer's weights,
with ``linear_out`` made after them as the stock layer's fourth linear.
"""

import math
import sys

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from espnet_mha import cache_records, module_keys, quantized
from espnet_mha.fused_keys import FUSED_PROJECTION, STOCK_PROJECTIONS

_ESPNET_INITIALIZE = "espnet2.torch_utils.initialize"  # the module whose initialize() calls our hook


def _undrawn_linear(n_in, n_out):
    """``nn.Linear(n_in, n_out)`` with its parameters allocated (default device and dtype)
    but not initialised, and no random numbers drawn. Built on the meta device rather
    than by ``nn.utils.skip_init``, whose ``to_empty`` cannot swap parameters under
    ``FakeTensorMode`` (construction there raised)."""
    with torch.device("meta"):
        linear = nn.Linear(n_in, n_out)
    linear.weight = nn.Parameter(torch.empty(n_out, n_in))
    linear.bias = nn.Parameter(torch.empty(n_out))
    return linear


def _stock_tensors(modules):
    """``(weights, biases)`` of the stock ``linear_q/k/v`` (their ``_parameters``, in order).
    Refuses mixed dtypes, on which the stock layer's linears raise (``torch.cat`` would
    promote them).

    Raises:
        TypeError: the tensors differ in dtype (names each and its dtype).
    """
    params = [modules[name]._parameters for name in STOCK_PROJECTIONS]
    weights, biases = [p["weight"] for p in params], [p["bias"] for p in params]
    dtype = weights[0].dtype
    if any(t.dtype != dtype for t in (*weights, *biases)):
        raise TypeError("the stock projections' parameters must share one dtype (the stock layer's linears raise "
                        "on mixed dtypes too), got " + ", ".join(
                            f"{name}.{param} {p[param].dtype}" for name, p in zip(STOCK_PROJECTIONS, params)
                            for param in ("weight", "bias")))
    return weights, biases


# Which rows of the fused weight each stock projection is, for messages.
_ROWS = {"linear_q": "0:D", "linear_k": "D:2D", "linear_v": "2D:3D"}


def _layout_without(modules, name):
    """The layout (``"fused"`` or ``"stock"``) of a layer whose ``modules`` have no place for
    the q/k/v projection ``name`` (it belongs to the other layout), else None."""
    if name in STOCK_PROJECTIONS and FUSED_PROJECTION in modules:
        return "fused"
    if name == FUSED_PROJECTION and any(stock in modules for stock in STOCK_PROJECTIONS):
        return "stock"
    return None


def _check_projection_name(layer, name, module):
    """Refuse a module assigned under a q/k/v name the layer's layout never calls:
    ``linear_q``/``linear_k``/``linear_v`` on the fused layout (its ``linear_qkv``
    computes all three), ``linear_qkv`` on the stock one. The stock layer calls
    whatever module holds those names (an adapter, a LoRA linear swapped in by
    assignment); here such a module would be kept, saved in the state dict and
    never run, and the layer would go on computing with the old weights (a probe:
    0.23 off the stock layer, without a word).

    Raises:
        AttributeError: names the attribute, the layout and what to do instead.
    """
    modules = layer.__dict__.get("_modules")
    if not modules:
        return  # during construction, before the projections exist
    layout = _layout_without(modules, name)
    if layout == "fused":
        raise AttributeError(
            f"cannot set {name} to a {type(module).__name__}: this layer has the fused {FUSED_PROJECTION} "
            f"(state_dict_layout='fused'), which computes q, k and v, so a module set as {name} would never be "
            f"called. Build the layer with state_dict_layout='stock' (it has the stock linear_q/k/v, and calls "
            f"whatever module holds them), or replace {FUSED_PROJECTION} (nn.Linear(D, 3D), rows q, k, v)")
    if layout == "stock":
        raise AttributeError(
            f"cannot set {name} to a {type(module).__name__}: this layer has the stock linear_q/k/v "
            f"(state_dict_layout='stock'), so a module set as {name} would never be called. Replace linear_q, "
            f"linear_k or linear_v, or build the layer with state_dict_layout='fused'")


class ParameterLayout:
    """Mixin for :class:`espnet_mha.layer.FlashMultiHeadedAttention`: its projections
    (needs ``n_feat``, ``_modules``)."""

    def _make_projections(self, n_feat, state_dict_layout):
        """Make the q/k/v projection in ``state_dict_layout``, then ``linear_out``."""
        if state_dict_layout == "stock":
            # The stock layer's parameters, made in its order (the same random draws).
            for name in STOCK_PROJECTIONS:
                self.add_module(name, nn.Linear(n_feat, n_feat))
        else:
            self.linear_qkv = _undrawn_linear(n_feat, 3 * n_feat)  # _reset_qkv draws in the stock order
            self._reset_qkv()
            # Unregistered: after quantize_dynamic swaps linear_qkv, its float weights
            # re-quantize q, k and v separately, as the stock layer's (see espnet_mha.quantized).
            object.__setattr__(self, "_float_linear_qkv", self.linear_qkv)
        self.linear_out = nn.Linear(n_feat, n_feat)

    def __setattr__(self, name, value):
        if isinstance(value, nn.Module):
            _check_projection_name(self, name, value)
        super().__setattr__(name, value)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            layout = _layout_without(self.__dict__.get("_modules", {}), name)
            if layout == "fused":
                raise AttributeError(
                    f"{type(self).__name__} has no attribute {name!r}: this layer has the fused {FUSED_PROJECTION} "
                    f"(state_dict_layout='fused'), nn.Linear(D, 3D) with rows q, k, v ({name} is rows "
                    f"{_ROWS[name]}); build it with state_dict_layout='stock' for the stock linear_q/k/v") from None
            if layout == "stock":
                raise AttributeError(
                    f"{type(self).__name__} has no attribute {name!r}: this layer has the stock linear_q/k/v "
                    "(state_dict_layout='stock')") from None
            raise

    def add_module(self, name, module):
        """``nn.Module.add_module`` (also behind ``register_module``), refusing a q/k/v
        projection of the other layout (see :func:`_check_projection_name`)."""
        if module is not None:
            _check_projection_name(self, name, module)
        super().add_module(name, module)

    @property
    def state_dict_layout(self):
        """"fused" or "stock": the parameter layout, decided at construction (read-only;
        build the layer with the other ``state_dict_layout``, or convert a state dict
        with :func:`espnet_mha.to_stock`/:func:`espnet_mha.to_fused`). A fused layer
        pickled by an older espnet-mha keeps the value it was pickled with."""
        if FUSED_PROJECTION in self._modules:
            return self.__dict__.get("state_dict_layout", "fused")
        return "stock"

    @state_dict_layout.setter
    def state_dict_layout(self, value):
        raise AttributeError(
            f"state_dict_layout is decided when the layer is built (it decides which parameters the layer "
            f"has), got an assignment of {value!r}: build the layer with state_dict_layout={value!r}, or "
            f"convert its state dict with espnet_mha.to_stock / espnet_mha.to_fused")

    def _reset_qkv(self):
        # Initialise q, k, v exactly as three stock nn.Linear(D, D) would, in the
        # stock order, so the same seed gives the same weights as the stock layer.
        # linear_out is created right after, as the fourth stock linear.
        bound = 1.0 / math.sqrt(self.n_feat)
        with torch.no_grad():
            for weight, bias in zip(self.linear_qkv.weight.chunk(3), self.linear_qkv.bias.chunk(3)):
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                nn.init.uniform_(bias, -bound, bound)

    def espnet_initialization_fn(self):
        """ESPnet's hook, called by ``espnet2.torch_utils.initialize.initialize(model, init)``
        (the ``--init`` option) after it initialised every weight.

        Xavier scales by ``fan_in + fan_out``, which for the fused ``(3D, D)`` weight is
        ``4D`` where the stock layer's ``(D, D)`` weights have ``2D``: its q/k/v
        weights would start ``sqrt(2)`` times smaller than the stock layer's (the
        other ``--init`` choices depend on ``fan_in`` only, the same for both). The
        hook gets no arguments, so it reads ``init`` from the caller's frame when the
        caller is ESPnet's ``initialize``; called from anywhere else it does nothing.
        """
        caller = sys._getframe(1)
        if caller.f_code.co_name != "initialize" or caller.f_globals.get("__name__") != _ESPNET_INITIALIZE:
            return
        qkv = self._modules.get(FUSED_PROJECTION)  # the stock parameters need no correction
        if qkv is not None and caller.f_locals.get("init") in ("xavier_uniform", "xavier_normal"):
            weight = qkv._parameters.get("weight")
            if weight is not None:
                with torch.no_grad():
                    weight.mul_(math.sqrt(2.0))

    def _qkv_modules(self):
        """The modules of the q/k/v projection: ``(linear_qkv,)``, or with the stock
        parameters ``(linear_q, linear_k, linear_v)``."""
        modules = self._modules
        qkv = modules.get(FUSED_PROJECTION)
        return (qkv,) if qkv is not None else tuple(modules[name] for name in STOCK_PROJECTIONS)

    def _qkv_plain(self):
        """Whether the q/k/v projection's parameters may be read (see :func:`quantized.is_plain`)."""
        return all(quantized.is_plain(module) for module in self._qkv_modules())

    def _qkv_rows(self):
        """``((w_q, b_q), (w_k, b_k), (w_v, b_v))``: views of the fused rows, or the stock parameters."""
        modules = self._qkv_modules()
        if len(modules) == 3:
            return tuple((module.weight, module.bias) for module in modules)
        return tuple(zip(modules[0].weight.chunk(3), modules[0].bias.chunk(3)))

    def _query_projection(self):
        """``(w, b)`` whose first D rows project the query: the fused parameters, or ``linear_q``'s."""
        modules = self._modules
        module = modules.get(FUSED_PROJECTION)
        params = (modules["linear_q"] if module is None else module)._parameters
        return params["weight"], params["bias"]

    def _kv_params(self):
        """``(w_kv (2D, D), b_kv (2D,))``: the key/value rows of the fused parameters (views),
        or the stock ``linear_k`` and ``linear_v`` stacked (so a decoding cache's graph
        reaches only them, as the stock step's keys and values do)."""
        modules = self._modules
        qkv = modules.get(FUSED_PROJECTION)
        if qkv is not None:
            d = self.n_feat
            return qkv._parameters["weight"][d:], qkv._parameters["bias"][d:]
        weights, biases = _stock_tensors(modules)  # linear_q checked too: the step reads it alone
        return torch.cat(weights[1:]), torch.cat(biases[1:])

    def _params(self):
        """``(w_qkv (3D, D), b_qkv (3D,), w_out, b_out)``: the fused parameters, or the stock
        ones stacked (a new ``torch.cat`` per call, so gradients reach the three linears
        and no copy can go stale)."""
        # Plain dict lookups: nn.Module.__getattr__ costs about a microsecond per
        # hop, which adds up on the decoding hot path (one call per layer and step).
        modules = self._modules
        out, qkv = modules["linear_out"]._parameters, modules.get(FUSED_PROJECTION)
        if qkv is not None:
            qkv = qkv._parameters
            return qkv["weight"], qkv["bias"], out["weight"], out["bias"]
        weights, biases = _stock_tensors(modules)
        return torch.cat(weights), torch.cat(biases), out["weight"], out["bias"]

    def _plain_weights(self):
        """(what tells the key/value projection's current weights, the tensors it reads) when
        the q/k/v projection is plain (:func:`quantized.is_plain`), else None: the fused
        linear's :func:`cache_records.weights_key` and its weight and bias, or those of the stock
        ``linear_k`` and ``linear_v``. On the decoding hot path: plain lookups."""
        modules = self._modules
        qkv = modules.get(FUSED_PROJECTION)
        if qkv is not None:
            if not quantized.is_plain(qkv):
                return None
            weight, bias = qkv._parameters["weight"], qkv._parameters["bias"]
            return cache_records.weights_key(weight, bias), (weight, bias)
        q, k, v = (modules[name] for name in STOCK_PROJECTIONS)
        if not (quantized.is_plain(q) and quantized.is_plain(k) and quantized.is_plain(v)):
            return None
        (w_k, b_k), (w_v, b_v) = ((m._parameters["weight"], m._parameters["bias"]) for m in (k, v))
        return (cache_records.weights_key(w_k, b_k), cache_records.weights_key(w_v, b_v)), (w_k, b_k, w_v, b_v)

    def _weights(self):
        """:meth:`_plain_weights`, else :func:`module_keys.modules_key` of the modules the layer
        calls for the keys and values, and their parameters (see :func:`cache_records.record`)."""
        plain = self._plain_weights()
        if plain is not None:
            return plain
        modules = self._qkv_modules()[-2:]
        return module_keys.modules_key(self, modules), tuple(p for module in modules for p in module.parameters())

    def _kv_may_change(self):
        """Whether the key/value projection, called as a module (not a plain linear), may
        compute differently at each call: in training mode, holding buffers
        (spectral_norm's power iteration updates its ``_u``) or a dropout (LoRA's). The
        stock step calls it at every step, after the query projection, on the whole
        (expanded) memory; a cache would call it once, on one row, so such a layer
        computes as the stock step. (The query and output projections are called at
        every step, in the stock order, either way.) Not seen: a module that draws
        random numbers in its own ``forward`` (``F.dropout``); decode in ``eval()``. Also
        True for parameters or buffers of a tensor subclass (torchao's, a DTensor), which
        may have no storage for the cache's records (the step raised)."""
        for module in self._qkv_modules()[-2:]:
            if not quantized.is_plain(module):
                for part in module.modules():
                    if part.training and (part._buffers or isinstance(part, _DropoutNd)):
                        return True
                if quantized.has_subclass_tensors(module):
                    return True
        return False
