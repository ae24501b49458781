"""Projections the layer must call as modules: quantized, LoRA, parametrized, hooked.

The fast path reads the q/k/v projection's parameters (``linear_qkv``, or the
stock ``linear_q/k/v``) and ``linear_out``'s directly. Where
that would skip what calling them does (:func:`is_plain`: a subclass such as
loralib's ``Linear``, a parametrization, forward or backward hooks, a quantized
swap), the layer calls the modules instead (:class:`Projections`), once per input.

Dynamically quantized projections come from ``asr_inference --quantize_asr_model
true``: ESPnet decodes with ``torch.quantization.quantize_dynamic(model,
{nn.Linear}, dtype)``, which swaps every ``nn.Linear``, our fused ``linear_qkv``
and ``linear_out`` too, for a quantized module. After ``load_state_dict`` into
such a model (new packed weights) the re-quantized parts below are made again.

One detail makes that differ from the stock layer: with per-tensor int8
weights (ESPnet's default, ``qint8``), the stock layer's three ``nn.Linear``
get three weight scales and our fused one gets one, so the rounding differs.
The layer keeps a reference to its float ``linear_qkv`` (not registered, so
``quantize_dynamic``'s copy keeps it too) and re-quantizes the q, k and v rows
separately with the scheme of the swapped module, after checking that this
scheme reproduces the fused module's weights exactly. Then it computes what the
quantized stock layer computes. Where that check fails (another observer, an
unknown module) the fused module is called as it is and a warning says that
results are close to, not the same as, the quantized stock layer's. Per-channel
int8 and float16 weights need no re-quantization: their rounding does not
depend on the fusion. Nor does a layer with the stock parameters
(``state_dict_layout="stock"``): ``quantize_dynamic`` swaps its ``linear_q/k/v``
one by one, as the stock layer's, and they are called as they are.
"""

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from espnet_mha import compile_policy, dispatch, functional
from espnet_mha.fused_keys import STOCK_PROJECTIONS


@dataclass(frozen=True)
class Projections:
    """The layer's projections as modules (each ``(..., D) -> (..., D)``) and the
    dtype/device its inputs must have."""

    q: Callable
    k: Callable
    v: Callable
    out: Callable
    reference: torch.Tensor  # a tensor of the dtype and device inputs must have
    exact: bool  # computes what the quantized stock layer computes
    fused: Callable = None  # the (..., D) -> (..., 3D) module when q, k, v are its rows


# Parameters the layer may read (torch.func.functional_call swaps in plain tensors).
_PLAIN_TENSORS = (nn.Parameter, torch.Tensor)


def readable(tensor):
    """Whether the layer may read ``tensor`` as a parameter (slice it, hand it to its own
    GEMMs): a plain tensor or ``nn.Parameter``, a subclass of ``nn.Parameter`` that
    changes no dispatch (a tag), or a FakeTensor (``torch.export`` traces with them). Not
    a tensor subclass with kernels of its own (torchao's, a DTensor, TwoTensor)."""
    kind = type(tensor)
    if kind in _PLAIN_TENSORS:
        return True
    if not isinstance(tensor, torch.Tensor):
        return False
    return is_fake(tensor) or (kind.__torch_dispatch__ is torch.Tensor.__torch_dispatch__
                               and kind.__torch_function__ == nn.Parameter.__torch_function__)


def is_plain(module):
    """Whether the layer may read ``module``'s parameters instead of calling it (its fast
    path): an ``nn.Linear`` itself, holding its weight and bias as parameters, without hooks.

    Anything else is called as a module, as the stock layer calls its linears: a
    subclass (loralib's ``Linear`` adds its low-rank update in ``forward``), a
    parametrization or a quantized swap (no ``weight`` parameter), a weight or bias of
    a tensor subclass (torchao's, a DTensor: their ``F.linear``), and forward or
    backward hooks on the module, which would otherwise never run. (Global hooks,
    ``register_module_forward_hook``, are not looked at: tracking tools such as
    ``FlopCounterMode`` install them, and would then see another computation.)"""
    params = module._parameters
    return (type(module) is nn.Linear and readable(params.get("weight")) and readable(params.get("bias"))
            and not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
            and not module._backward_pre_hooks)


def has_subclass_tensors(module):
    """Whether ``module`` or its children hold a parameter or buffer of a tensor subclass
    (torchao's quantized weights, a DTensor, a wrapper such as TwoTensor): it runs its own
    kernels, and may have no storage for a decoding cache's records."""
    return not all(map(readable, (*module.parameters(), *module.buffers())))


def _why_called(module):
    params = module._parameters
    if type(module) is not nn.Linear or params.get("weight") is None:
        kind = type(module)
        return ("it is an nn.Linear without a plain weight parameter" if kind is nn.Linear
                else f"it is a {kind.__module__}.{kind.__qualname__}, not an nn.Linear")
    if params.get("bias") is None:
        return "it has no bias"
    # Loops, not next() over a generator, here and in _first_float_parameter: torch 2.5's Dynamo cannot
    # trace next() with a default (a user's fullgraph compile of such a layer failed there).
    for tensor in (params["weight"], params["bias"]):
        if not readable(tensor):
            return f"its parameters are of a tensor subclass, {type(tensor).__name__}"
    return "it has hooks"


def _per_tensor_int8(module):
    """A dynamic quantized linear with one int8 weight scale (ESPnet's default qint8)."""
    return (module._packed_params.dtype == torch.qint8
            and module.weight().qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric))


def _rows(module, start, stop):
    return lambda x: module(x)[..., start:stop]


def _requantized_parts(quantized, source):
    """The q, k, v rows of ``source`` (the float fused linear) quantized separately with
    ``quantized``'s scheme, or None where that scheme cannot be reproduced exactly."""
    if not isinstance(quantized, torch.ao.nn.quantized.dynamic.Linear) or not isinstance(source, nn.Linear):
        return None
    if source.weight.shape != (quantized.out_features, quantized.in_features) or source.weight.device.type != "cpu":
        return None
    if not _per_tensor_int8(quantized):
        return None  # float16 and per-channel rounding is elementwise / per row: the fused module is exact
    qconfig = torch.ao.quantization.default_dynamic_qconfig

    def quantize(weight, bias):
        linear = nn.utils.skip_init(nn.Linear, weight.size(1), weight.size(0))  # no draws from the global RNG
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        linear.qconfig = qconfig
        return type(quantized).from_float(linear)

    with torch.no_grad():
        # The bias is the quantized module's own (float, kept as it is by the quantization):
        # one set on it since the swap (set_weight_bias, a quantized checkpoint) was lost
        # for the float copy's, 1.4 off the quantized stock layer (a probe).
        bias = quantized.bias()
        if bias is None:
            return None
        weight, bias = source.weight.detach().float(), bias.detach().float()
        fused = quantize(weight, bias).weight()
        expected = quantized.weight()
        if fused.q_scale() != expected.q_scale() or not torch.equal(fused.int_repr(), expected.int_repr()):
            return None  # another observer, or the float weights changed since the swap
        return tuple(quantize(w, b) for w, b in zip(weight.chunk(3), bias.chunk(3)))


def projections(layer):
    """:class:`Projections` for a layer whose linears were swapped (None if they were not):
    by ``quantize_dynamic``, or by any module that holds no ``weight`` parameter
    (e.g. a ``torch.nn.utils.parametrize`` parametrization), which is then called as it is.
    Made once per set of modules (and packed quantized weights) and kept on the layer."""
    modules, out = layer._qkv_modules(), layer._modules["linear_out"]
    if layer._qkv_plain() and is_plain(out):
        return None
    if len(modules) == 1 and isinstance(modules[0], torch.ao.nn.quantized.dynamic.Linear) \
            and compile_policy.capturing():
        # The re-quantized q/k/v parts are not submodules, so a trace cannot hold their
        # packed weights; the fused module alone would change the numbers.
        raise RuntimeError(
            "a quantize_dynamic'd FlashMultiHeadedAttention cannot be traced or exported "
            "(torch.jit.trace, torch.export, ONNX): its re-quantized q/k/v parts are not "
            "submodules. Trace or export the float model and quantize the result instead."
        )
    # A quantized module's weights change by replacing its packed parameters
    # (load_state_dict): the projections (re-quantized parts) are then made again.
    key = (*modules, out, *(_packed(module) for module in modules))
    cached = layer.__dict__.get("_projections")
    if cached is not None and len(cached[0]) == len(key) and all(a is b for a, b in zip(cached[0], key)):
        return cached[1]
    if len(modules) == 3:
        # The stock parameters: each called as the stock layer calls it (quantize_dynamic
        # swaps each as it swaps the stock layer's, so no re-quantization is needed).
        parts, exact, fused = modules, True, None
        called = [f"{name}: {_why_called(module)}" for name, module
                  in zip((*STOCK_PROJECTIONS, "linear_out"), (*modules, out)) if not is_plain(module)]
        compile_policy.log(__name__, logging.INFO, "espnet_mha: the layer calls its linears as modules (%s)",
                           "; ".join(called))
    else:
        parts, exact, fused = _fused_parts(layer, modules[0], out)
    # What inputs must be: the swapped modules' float parameters (a parametrization),
    # else float32 on the CPU (dynamic quantized modules).
    reference = _first_float_parameter(modules)
    result = Projections(*parts, out, torch.empty(0) if reference is None else reference, exact, fused)
    # object.__setattr__, not a write to __dict__: torch 2.5's Dynamo traces only the former
    # (plain attributes either way: nn.Module.__setattr__ would look for modules to register).
    object.__setattr__(layer, "_projections", (key, result))
    object.__setattr__(layer, "_projections_made", layer.__dict__.get("_projections_made", 0) + 1)
    return result


def _first_float_parameter(modules):
    """The first floating-point parameter of ``modules``, in order (None if none): a loop, as
    in :func:`_why_called`, for torch 2.5's Dynamo."""
    for module in modules:
        for p in module.parameters():
            if p.is_floating_point():
                return p
    return None


def _fused_parts(layer, qkv, out):
    """``(q, k, v callables, exact, fused module or None)`` for a fused ``linear_qkv`` the
    layer calls: the re-quantized q/k/v parts where they reproduce the quantized module,
    else the module's rows (see the module docstring)."""
    d = layer.n_feat
    quantized = isinstance(qkv, torch.ao.nn.quantized.dynamic.Linear)
    parts = _requantized_parts(qkv, layer.__dict__.get("_float_linear_qkv")) if quantized else None
    exact = parts is not None or not quantized or not _per_tensor_int8(qkv)
    fused = None
    if parts is None:
        fused = qkv
        parts = tuple(_rows(qkv, i * d, (i + 1) * d) for i in range(3))
    if not exact:
        compile_policy.log(__name__, logging.WARNING, "espnet_mha: %s projections run fused: results are close "
                           "to, not the same as, the quantized stock layer's (see espnet_mha.quantized)",
                           type(qkv).__name__)
    elif not quantized:
        compile_policy.log(__name__, logging.INFO, "espnet_mha: the layer calls linear_qkv and linear_out as "
                           "modules (%s)", _why_called(qkv) if not is_plain(qkv) else f"linear_out: {_why_called(out)}")
    return parts, exact, fused


def _packed(module):
    """A dynamic quantized module's packed weights (replaced when its weights change), else None."""
    params = getattr(module, "_packed_params", None)
    return getattr(params, "_packed_params", None)


def attend(proj, query, memory, keep, *, n_head, causal, dropout_p, training, backend):
    """:func:`functional.attend` with module projections."""
    d = query.size(-1)
    if proj.fused is not None:  # one call per input, as the stock layer calls each linear once
        qkv = proj.fused(query)
        kv = qkv[..., d:] if memory is None else proj.fused(memory)[..., d:]
        q, k, v = qkv[..., :d], kv[..., :d], kv[..., d:]
    else:
        source = query if memory is None else memory
        q, k, v = proj.q(query), proj.k(source), proj.v(source)
    q, k, v = (functional.heads(x, n_head) for x in (q, k, v))
    context, weights = dispatch.run(backend, q, k, v, keep, causal=causal, dropout_p=dropout_p, training=training)
    return proj.out(context), weights


def project_memory(proj, memory, n_head):
    """:func:`functional.project_memory` with module projections: ``(b, 2, H, T2, d_k)``."""
    memory = functional.shared_memory(memory)
    kv = (proj.fused(memory)[..., memory.size(-1):] if proj.fused is not None
          else torch.cat([proj.k(memory), proj.v(memory)], dim=-1))
    return functional.kv_cache(kv, n_head)


def attend_cached(proj, query, kv, keep, *, backend, dropout_p):
    """:func:`functional.attend_cached` with module projections."""
    n_head = kv.size(2)
    # The modules get the shapes the stock step (forward of the (B, D) query) gives them,
    # (B, D) to the query projection and (B, 1, D) to linear_out: hooks may index them.
    q = proj.q(query).view(query.size(0), n_head, -1).transpose(0, 1)  # (H, B, d_k)
    context, weights = functional.cached_context(q, kv, keep, backend=backend, dropout_p=dropout_p)
    return proj.out(context.unsqueeze(1)).squeeze(1), weights


def step_self(proj, query, cache, keep, *, n_head, backend, dropout_p):
    """:func:`functional.step_self` with module projections."""
    qkv = proj.fused(query) if proj.fused is not None else torch.cat([proj.q(query), proj.k(query), proj.v(query)],
                                                                      dim=-1)
    context, new, weights = functional.step_self_context(qkv, cache, keep, n_head=n_head, backend=backend,
                                                         dropout_p=dropout_p)
    return proj.out(context), new, weights
