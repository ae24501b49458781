"""The layer's state-dict hooks: a stock ESPnet state dict loads into our fused layout
(and a fused one into a layer built with the stock parameters) with a plain
``load_state_dict``.

The pre-hook registered on every ``FlashMultiHeadedAttention`` makes a plain
strict ``model.load_state_dict(stock_state_dict)`` work for a whole ESPnet
model. The key conversion itself is in :mod:`espnet_mha.fused_keys`; whole state
dicts (wrapper prefixes, export to the stock layout, files) are handled in
:mod:`espnet_mha.checkpoint` and :mod:`espnet_mha.convert`.
"""

import logging

import torch

from espnet_mha import checks
from espnet_mha.fused_keys import (
    FUSED_PROJECTION,
    PARAMS,
    STOCK_PROJECTIONS,
    fuse_keys,
    stock_keys,
    unfuse_keys,
    unfuse_part,
)

# What quantize_dynamic leaves of the stock linear_q/k/v in a state dict (their first two key segments).
_QUANTIZED_STOCK_KEYS = {(name, part) for name in STOCK_PROJECTIONS for part in ("scale", "zero_point", "_packed_params")}

logger = logging.getLogger(__name__)


class LoadValueError(ValueError, RuntimeError):
    """A state dict that cannot be loaded into a layer (a q/k/v tensor of the wrong shape):
    a ``ValueError`` that is also the ``RuntimeError`` ``load_state_dict`` raises for the
    stock layer, so code that catches that catches this too."""


class LoadTypeError(TypeError, RuntimeError):
    """A q/k/v entry that is not a tensor, met by ``load_state_dict`` (see :class:`LoadValueError`)."""


def _as_load_error(error):
    """``error`` (a ``ValueError`` or ``TypeError``) as the matching load error, same message."""
    kind = LoadTypeError if isinstance(error, TypeError) else LoadValueError
    return kind(*error.args)


LAYOUTS = ("fused", "stock")


def resolve_layout(state_dict_layout):
    """``state_dict_layout`` as one of :data:`LAYOUTS` (None, a YAML ``null``, is the default
    "fused"; any case, surrounding spaces ignored).

    Raises:
        ValueError: not a layout.
    """
    layout = "fused" if state_dict_layout is None else checks.option_word(state_dict_layout)
    if layout not in LAYOUTS:
        raise ValueError(f"state_dict_layout must be one of {LAYOUTS}, got {state_dict_layout!r}")
    return layout


def state_dict_post_hook(module, state_dict, prefix, local_metadata):
    """``state_dict`` post-hook of layers pickled (``torch.save(model)``, ``copy.deepcopy``)
    by espnet-mha before the stock layout held the stock parameters: such a layer has a
    fused ``linear_qkv`` and ``state_dict_layout="stock"``, and its pickle names this
    function. It writes the stock keys as it did then; layers built now do not
    register it (their stock layout has the stock parameters themselves).

    The q/k/v entries are views of the fused parameters (as a state dict's entries
    share the parameters' storage: in-place updates through them, as an EMA does,
    reach the layer), in the stock layer's key order. Left as they are: under
    ``state_dict(keep_vars=True)`` the entries are the parameters themselves, which
    have only the fused names; and a ``linear_qkv`` without a plain weight and bias
    (parametrized, pruned, quantized) has no stock counterpart.
    """
    if getattr(module, "state_dict_layout", "fused") != "stock":
        return
    fused = [f"{prefix}{FUSED_PROJECTION}.{param}" for param in PARAMS]
    if any(key not in state_dict or isinstance(state_dict[key], torch.nn.Parameter) for key in fused):
        return
    parts = {param: state_dict.pop(key).chunk(3, dim=0) for param, key in zip(PARAMS, fused)}
    rest = {key: state_dict.pop(key) for key in [key for key in state_dict if key.startswith(prefix)]}
    for i, name in enumerate(STOCK_PROJECTIONS):
        for param in PARAMS:
            state_dict[f"{prefix}{name}.{param}"] = parts[param][i]
    state_dict.update(rest)


def load_state_dict_pre_hook(module, state_dict, prefix, *args):
    """``load_state_dict`` pre-hook of our layer: accept the stock layout.

    Registered on every ``FlashMultiHeadedAttention``, so a plain strict
    ``load_state_dict`` of a whole model converts exactly the keys under our
    layers' prefixes and nothing else (a transformer encoder's ``linear_q``
    stays as it is).

    ESPnet's ``--init_param`` (``load_pretrained_model``) loads
    ``model.state_dict()`` updated with the file, so a file arrives with the
    layer's *current* tensors beside its own, possibly in the other layout, and
    without the keys the user excluded. Entries equal to the layer's current
    parameters are therefore the model's, and the file wins: beside a file's
    stock keys they fill in the q/k/v parts the file lacks (as the stock layer
    keeps its excluded ``linear_q``), and beside a file's fused keys they are
    dropped. A state dict with only some of the six stock keys (a partial
    checkpoint) loads what it has, as into the stock layer: the layer's current
    rows stand in for the absent parts, which are added to ``load_state_dict``'s
    missing keys under their stock names (it raises under ``strict=True`` and
    returns them under ``strict=False``, as the stock layer). Parts that cannot be
    stacked as they are (mixed dtypes or devices) are cast to the layer's, as
    ``load_state_dict`` casts what it copies. Any other mix of layouts (stock and
    fused keys from a file) is logged as a warning with ``fuse_keys``'s
    explanation and left as it is, so ``load_state_dict`` reports the keys as
    missing/unexpected. (The hook cannot raise only when strict:
    ``load_state_dict`` gives every hook ``strict=True`` whatever the caller
    asked.)

    A layer with the stock parameters (``state_dict_layout="stock"``) takes the
    fused layout the same way: a file's ``linear_qkv`` is split into its
    ``linear_q/k/v`` keys (beside the model's own stock entries, the file wins).

    Raises:
        LoadValueError, LoadTypeError: a q/k/v tensor has the wrong shape, or is not a
            tensor (see ``fuse_keys``), or a quantized stock state dict meets the fused
            ``linear_qkv`` (also ``RuntimeError``s, what the stock layer's load raises).
    """
    module._forget_records()  # the parameters may be swapped (see FlashMultiHeadedAttention._forget_records)
    stock = [key for key in stock_keys(prefix) if key in state_dict]
    fused = {param: f"{prefix}{FUSED_PROJECTION}.{param}" for param in PARAMS}
    if FUSED_PROJECTION not in module._modules:
        _load_into_stock_parameters(module, state_dict, prefix, stock, fused)
        return
    params = module.linear_qkv._parameters  # empty after quantize_dynamic swapped it
    packed = [key for key in state_dict if key.startswith(prefix)
              and tuple(key[len(prefix):].split(".")[:2]) in _QUANTIZED_STOCK_KEYS]
    if packed:
        raise LoadValueError(
            f"{packed[0]}: a quantize_dynamic'd stock state dict cannot be loaded into a layer with the fused "
            "linear_qkv (each of linear_q/k/v was packed with its own scale). Load the float checkpoint and "
            "quantize after (as asr_inference --quantize_asr_model does), or build the layer with "
            "state_dict_layout='stock'."
        )
    if stock and all(key in state_dict for key in fused.values()) and all(params.get(param) is not None for param in PARAMS):
        if all(_equal(state_dict[key], params[param]) for param, key in fused.items()):
            # The model's current fused tensors beside a file's stock keys.
            for param, key in fused.items():
                current = state_dict.pop(key)
                for name, part in zip(STOCK_PROJECTIONS, current.chunk(3, dim=0)):
                    state_dict.setdefault(f"{prefix}{name}.{param}", part)
        elif all(_equal(state_dict[key], part) for key, part in _stock_parts(prefix, params).items() if key in stock):
            # The model's current stock-layout tensors beside a file's fused keys.
            for key in stock:
                del state_dict[key]
    _cast_mixed_parts(state_dict, prefix, params)
    if len(args) > 2:  # (local_metadata, strict, missing_keys, ...)
        _fill_absent_parts(state_dict, prefix, params, args[2])
    try:
        fuse_keys(state_dict, prefix, n_feat=module.n_feat)
    except KeyError as error:
        logger.warning("espnet_mha: %s; these keys are left as they are for load_state_dict to report",
                       error.args[0])
    except (ValueError, TypeError) as error:
        raise _as_load_error(error) from None


def _load_into_stock_parameters(module, state_dict, prefix, stock, fused):
    """The pre-hook for a layer with the stock ``linear_q/k/v``: split a fused file's keys
    (``stock``: the stock keys present, ``fused``: the fused key per parameter). A file
    with only one of them (a partial checkpoint) loads what it has, as a partial stock
    file does: the absent parameter's stock keys are left to ``load_state_dict``."""
    present = [param for param, key in fused.items() if key in state_dict]
    if not present:
        return  # the stock layout: nothing to do
    # The model's own entries for what the file's fused keys hold (--init_param loads
    # model.state_dict() updated with the file) give way to the file.
    covered = [key for key in stock if key.rsplit(".", 1)[1] in present]
    current = {f"{prefix}{name}.{param}": module._modules[name]._parameters.get(param)
               for name in STOCK_PROJECTIONS for param in PARAMS}
    if covered and all(current[key] is not None and _equal(state_dict[key], current[key]) for key in covered):
        for key in covered:
            del state_dict[key]
    clash = [key for key in stock_keys(prefix) if key in state_dict and key.rsplit(".", 1)[1] in present]
    if clash:
        logger.warning("espnet_mha: attention layer at %r has both fused keys %s and stock keys %s; these keys "
                       "are left as they are for load_state_dict to report", prefix,
                       [fused[param] for param in present], clash)
        return
    try:
        if len(present) == len(fused):
            unfuse_keys(state_dict, prefix)
        else:
            unfuse_part(state_dict, prefix, present[0])
    except (ValueError, TypeError) as error:
        raise _as_load_error(error) from None


def _cast_mixed_parts(state_dict, prefix, params):
    """Stock q/k/v tensors that cannot be stacked as they are (of different dtypes or
    devices, or, for a partial state dict, other than the layer's current rows) are cast
    to the layer's dtype and device, as ``load_state_dict`` casts what it copies: the
    stock layer loads them."""
    present = [key for key in stock_keys(prefix) if isinstance(state_dict.get(key), torch.Tensor)]
    reference = params.get("weight")
    if not present or reference is None or reference.is_meta or any(state_dict[key].is_meta for key in present):
        return  # nothing to copy from or into: fuse_keys names the parts
    kinds = {(state_dict[key].dtype, state_dict[key].device) for key in present}
    partial = len(present) < len(stock_keys(prefix))
    if len(kinds) > 1 or (partial and kinds != {(reference.dtype, reference.device)}):
        for key in present:
            state_dict[key] = state_dict[key].to(device=reference.device, dtype=reference.dtype)


def _fill_absent_parts(state_dict, prefix, params, missing_keys):
    """Where ``state_dict`` has some but not all of a layer's stock keys and no fused
    ones, put the layer's current rows (``params``) under the absent keys and add
    those keys to ``missing_keys``: ``load_state_dict`` then loads the present parts
    and reports the absent ones, as it does for the stock layer's own linears."""
    keys = stock_keys(prefix)
    present = [key for key in keys if key in state_dict]
    if not present or len(present) == len(keys):
        return
    if any(f"{prefix}{FUSED_PROJECTION}.{param}" in state_dict for param in PARAMS):
        return
    if any(params.get(param) is None or params[param].is_meta for param in PARAMS):
        return
    current = _stock_parts(prefix, params)
    if any(not isinstance(state_dict[key], torch.Tensor) or state_dict[key].dtype != current[key].dtype
           or state_dict[key].device != current[key].device for key in present):
        return  # fuse_keys cannot stack them with the current rows: its warning says why
    for key in keys:
        if key not in state_dict:
            state_dict[key] = current[key].detach()
            missing_keys.append(key)


def _stock_parts(prefix, params):
    """The stock keys of a layer whose fused parameters are ``params``, with their rows."""
    return {f"{prefix}{name}.{param}": part for param in PARAMS
            for name, part in zip(STOCK_PROJECTIONS, params[param].chunk(3, dim=0))}


def _equal(a, b):
    """Whether state-dict entry ``a`` holds exactly the values of parameter ``b``."""
    return (isinstance(a, torch.Tensor) and a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
            and not a.is_meta and torch.equal(a, b.detach()))
