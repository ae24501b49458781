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

from espnet_mha import quantized
from espnet_mha.state_dict import FUSED_PROJECTION, STOCK_PROJECTIONS

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


def _stack(params):
    """``(weight, bias)`` of the stock linears ``params`` (name -> their ``_parameters``)
    stacked in order. Refuses mixed dtypes, on which the stock layer's linears raise
    (``torch.cat`` would promote them).

    Raises:
        TypeError: the tensors differ in dtype (names each and its dtype).
    """
    tensors = [(f"{name}.{param}", p[param]) for name, p in params.items() for param in ("weight", "bias")]
    if any(t.dtype != tensors[0][1].dtype for _, t in tensors):
        raise TypeError("the stock projections' parameters must share one dtype (the stock layer's linears raise "
                        "on mixed dtypes too), got " + ", ".join(f"{n} {t.dtype}" for n, t in tensors))
    return (torch.cat([t for n, t in tensors if n.endswith(".weight")]),
            torch.cat([t for n, t in tensors if n.endswith(".bias")]))


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
        k, v = modules["linear_k"]._parameters, modules["linear_v"]._parameters
        return _stack({"linear_k": k, "linear_v": v})

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
        return (*_stack({name: modules[name]._parameters for name in STOCK_PROJECTIONS}), out["weight"], out["bias"])
