"""Whole-model state dicts: our layers fused, or exported to the stock layout.

A model's state dict holds our layers among other modules, some with the same
key names (a transformer encoder's ``linear_q/k/v``): these functions change
only our layers' keys (found by :mod:`espnet_mha.checkpoint_keys`). They return new ordered dicts with every other key, the
key order and ``_metadata`` (module versions) kept.

Plain ``load_state_dict`` never strips the ``module.``/``_orig_mod.`` prefixes
that DDP and ``torch.compile`` add (not for stock models either): call
:func:`load_stock_or_fused`, or convert the file once with
``espnet-mha-convert`` (:mod:`espnet_mha.convert`), which writes clean keys.
Stock state dicts without prefixes need neither: our layer's
``load_state_dict`` pre-hook fuses them.
"""

import logging
from collections import OrderedDict

import torch

from espnet_mha.checkpoint_io import LIGHTNING, TRAINING, training_kind
from espnet_mha.checkpoint_keys import (
    COMPILE_SEGMENT,
    DEFAULT_LAYER_PATTERN,
    FUSED_OTHER,
    STOCK_OTHER,
    fused_layers,
    fused_modules,
    stock_layers,
    strip_wrapper_prefixes,
)
from espnet_mha.fused_keys import (
    FUSED_PROJECTION,
    PARAMS,
    STOCK_PROJECTIONS,
    check_mapping,
    fuse_keys,
    stock_keys,
    unfuse_keys,
)


logger = logging.getLogger(__name__)


def _unwrap(model):
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _our_layer_sizes(model):
    sizes = {}
    for name, module in fused_modules(_unwrap(model)):
        name = ".".join(s for s in name.split(".") if s != COMPILE_SEGMENT)
        sizes[f"{name}." if name else ""] = module.n_feat
    return sizes


def _stock_n_feat(state_dict, prefix):
    # linear_out is the layer's reference size; q/k/v must match it.
    for name in ("linear_out", *STOCK_PROJECTIONS):
        key = f"{prefix}{name}.weight"
        if key in state_dict:
            weight = state_dict[key]
            # A probe: a list or a 0-D tensor here raised AttributeError or IndexError, and a
            # (0, D) weight "n_feat must be positive", an argument the caller never gave.
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"{key} must be a tensor, got {type(weight).__name__}")
            if weight.dim() != 2 or weight.size(0) != weight.size(1) or not weight.size(0):
                raise ValueError(f"{key}: expected a (D, D) weight, D > 0, found shape {tuple(weight.shape)}")
            return weight.size(0)
    return None


def to_fused(state_dict, *, model=None, layer_pattern=DEFAULT_LAYER_PATTERN):
    """Our layers' stock ``linear_q/k/v`` keys -> the fused ``linear_qkv`` (every other key kept).

    Which layers are ours: with ``model``, its ``FlashMultiHeadedAttention``
    modules with the fused parameter (sizes checked against them; layers built
    with the stock parameters keep their keys); without, the layers whose key prefix
    matches ``layer_pattern`` (by default an S4 decoder's attention layers, and a bare
    layer's top-level keys). Layers already fused stay as they are; other modules with
    the same key names (a transformer encoder's) are untouched. When nothing is
    converted although stock layers are there (no layer matches, or ``model`` has no
    fused layer), a warning says so.

    Args:
        state_dict: a model's state dict without wrapper prefixes (see
            :func:`strip_wrapper_prefixes`).
        model: optional; the (flash) model the state dict is meant for.
        layer_pattern: used without ``model``; see :func:`stock_layers`.

    Returns:
        OrderedDict with ``linear_qkv.weight`` ``(3D, D)`` and ``.bias`` ``(3D,)``
        in place of the six stock keys of each converted layer (new tensors, detached
        also from the parameters of a ``state_dict(keep_vars=True)``; the other
        entries are the given ones).

    Raises:
        TypeError: ``state_dict`` is not a mapping, or ``model`` not a module.
        KeyError: a layer of ``model`` has neither layout in the state dict; a
            layer is half-converted (names the missing keys) or has both layouts.
        ValueError: a q/k/v tensor has the wrong shape (names the key, expected
            and found shapes), or ``layer_pattern`` is not a valid expression.
    """
    check_mapping(state_dict)
    if model is None:
        layers = {p: _stock_n_feat(state_dict, p) for p in stock_layers(state_dict, layer_pattern=layer_pattern)}
        others = [] if layers else stock_layers(state_dict, layer_pattern=None)  # all of them, unmatched
        if others:
            logger.warning("to_fused converted nothing: no layer with linear_q/k/v keys matches layer_pattern %r "
                           "(%s); pass model= or a layer_pattern that matches the attention layers to fuse",
                           layer_pattern, ", ".join(map(repr, others[:3])) + (", ..." if len(others) > 3 else ""))
    elif not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    else:
        stock, fused = set(stock_layers(state_dict, layer_pattern=None)), set(fused_layers(state_dict))
        layers, ours = {}, _our_layer_sizes(model)
        for prefix, n_feat in ours.items():
            if prefix not in stock and prefix not in fused:
                raise KeyError(
                    f"the model's attention layer {prefix!r} has neither linear_q/k/v nor linear_qkv keys "
                    "in the state dict (wrapper prefixes? see strip_wrapper_prefixes)"
                )
            if prefix in stock:
                layers[prefix] = n_feat
        if not ours and stock:
            logger.warning("to_fused converted nothing: the model has no FlashMultiHeadedAttention with the fused "
                           "linear_qkv (a stock model, or layers built with state_dict_layout='stock', as the mha "
                           "name builds them under use_for_mha()), whose state dict keeps linear_q/k/v")
    _check_plain_stock(state_dict, layers)
    return _convert(state_dict, layers, fuse=True)


def to_stock(state_dict):
    """Fused ``linear_qkv`` keys -> stock ``linear_q/k/v`` keys (every other key kept).

    The result loads into a model built with ESPnet's stock ``mha`` with strict
    ``load_state_dict``; ``to_stock(to_fused(sd))`` is bit-identical to ``sd``
    (keys, order, tensors).

    Args:
        state_dict: a model's state dict.

    Returns:
        OrderedDict with ``linear_q/k/v.weight`` ``(D, D)`` and ``.bias`` ``(D,)``
        (copies, detached as :func:`to_fused`'s; the other entries are the given ones).

    Raises:
        TypeError: ``state_dict`` is not a mapping.
        KeyError: a layer has only one of ``linear_qkv.weight``/``.bias``, or
            both layouts.
        ValueError: a fused tensor is not ``(3D, D)``/``(3D,)`` (names the key,
            expected and found shapes).
    """
    check_mapping(state_dict)
    _check_plain_fused(state_dict)
    return _convert(state_dict, dict.fromkeys(fused_layers(state_dict)), fuse=False)


def _more(found):
    """`` (and N more such keys)`` after the first of ``found``, or nothing."""
    return f" (and {len(found) - 1} more such keys)" if len(found) > 1 else ""


def _check_plain_fused(keys):
    """Raise if a fused projection has keys beyond ``weight``/``bias``: they have no
    stock counterpart, and were passed through (quantized) or misreported (parametrized)."""
    other = [key for key in keys if FUSED_OTHER.match(key)]
    if other:
        raise ValueError(
            f"{other[0]}{_more(other)}: this layer's linear_qkv is not a plain "
            "nn.Linear (quantized, parametrized or adapted), and the stock layer has no counterpart for "
            "its keys. Export the float model before quantize_dynamic, or make the weight plain first: "
            "torch.nn.utils.prune.remove(layer.linear_qkv, 'weight') for pruning, "
            "torch.nn.utils.parametrize.remove_parametrizations(layer.linear_qkv, 'weight') for a parametrization."
        )


def _check_plain_stock(state_dict, prefixes):
    """Raise if a stock projection of a layer to be fused has keys beyond ``weight``/``bias``
    (loralib's ``lora_A``/``lora_B``, a parametrization's ``original0``/``original1``): the
    fused ``linear_qkv`` has no place for them, and a non-strict load (ESPnet's
    ``build_model_from_file``) dropped them without a word (a probe)."""
    other = [match for match in map(STOCK_OTHER.match, state_dict) if match and match.group(1) in prefixes]
    if other:
        raise ValueError(
            f"{other[0].string}{_more(other)}: this layer's {other[0].group(2)} is not a "
            "plain nn.Linear (adapted or parametrized), and the fused linear_qkv has no place for its keys. "
            "Merge the adapter into the weight and drop its keys first, or keep the stock parameter layout "
            "(state_dict_layout: stock), which keeps linear_q/k/v and their adapters."
        )


def _unfuse_checked(layer, prefix):
    both = [key for key in stock_keys(prefix) if key in layer]
    if both:
        raise KeyError(f"attention layer at {prefix!r} has both fused keys and stock {both}")
    weight, bias = (layer.get(f"{prefix}{FUSED_PROJECTION}.{param}") for param in PARAMS)
    for param, value in zip(PARAMS, (weight, bias)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{prefix}{FUSED_PROJECTION}.{param} must be a tensor, got {type(value).__name__}")
    if weight is not None and bias is not None:
        if weight.dim() != 2:  # a probe: a 0-D weight raised IndexError from shape[-1]
            raise ValueError(f"{prefix}{FUSED_PROJECTION}.weight: expected shape (3D, D), found {tuple(weight.shape)}")
        expected = (3 * weight.shape[-1], weight.shape[-1])
        if tuple(weight.shape) != expected:
            raise ValueError(f"{prefix}{FUSED_PROJECTION}.weight: expected shape (3D, D) = {expected}, "
                             f"found {tuple(weight.shape)}")
        if tuple(bias.shape) != expected[:1]:
            raise ValueError(f"{prefix}{FUSED_PROJECTION}.bias: expected shape {expected[:1]}, "
                             f"found {tuple(bias.shape)}")
    unfuse_keys(layer, prefix)


def _convert(state_dict, layers, *, fuse):
    """Rebuild ``state_dict`` with ``layers`` ({prefix: n_feat}) fused or unfused, in key order."""
    old, new = (STOCK_PROJECTIONS, (FUSED_PROJECTION,)) if fuse else ((FUSED_PROJECTION,), STOCK_PROJECTIONS)
    owner = {f"{p}{name}.{param}": p for p in layers for name in old for param in PARAMS}
    out, done = OrderedDict(), set()
    for key, value in state_dict.items():
        prefix = owner.get(key)
        if prefix is None:
            out[key] = value
            continue
        if prefix in done:
            continue
        done.add(prefix)
        names = [f"{prefix}{name}.{param}" for name in (*old, *new) for param in PARAMS]
        layer = {name: state_dict[name] for name in names if name in state_dict}
        if fuse:
            fuse_keys(layer, prefix, n_feat=layers[prefix])
        else:
            _unfuse_checked(layer, prefix)
        for name in new:
            for param in PARAMS:
                out[f"{prefix}{name}.{param}"] = layer[f"{prefix}{name}.{param}"]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        first = {f"{p}{old[0]}": p for p in layers}
        rest = {f"{p}{name}" for p in layers for name in old[1:]}
        out._metadata = OrderedDict()
        for name, value in metadata.items():
            if name in first:
                out._metadata.update((f"{first[name]}{n}", dict(value)) for n in new)
            elif name not in rest:
                out._metadata[name] = value
    return out


def load_stock_or_fused(model, state_dict, *, strict=True):
    """Load a stock or fused state dict, saved from a plain, compiled or DDP-wrapped model.

    Removes the wrapper prefixes (see :func:`strip_wrapper_prefixes`), unwraps
    ``model`` if it is compiled or wrapped, unfuses the layers that ``model``
    holds as stock ``MultiHeadedAttention`` (our layers take the stock layout
    through their pre-hook), then calls ``model.load_state_dict``. Without
    ``strict``, a state dict none of whose keys the model has loads nothing, with a
    warning (``load_state_dict`` itself says nothing).

    Args:
        model: the model to load into (may be compiled, DDP or DataParallel).
        state_dict: a flat state dict (``valid.acc.ave.pth`` style).
        strict: as in ``torch.nn.Module.load_state_dict``.

    Returns:
        what ``load_state_dict`` returns (missing and unexpected keys).

    Raises:
        TypeError: ``model`` is not a module, ``state_dict`` not a mapping, or a
            training checkpoint (pass its ``"model"`` entry) or a Lightning one.
        KeyError, ValueError: see :func:`fuse_keys` and :func:`to_stock`.
        RuntimeError: from ``load_state_dict`` (missing/unexpected keys, other shapes).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_mapping(state_dict)
    kind = training_kind(state_dict)
    if kind == TRAINING:
        raise TypeError("state_dict looks like an ESPnet training checkpoint (it has a 'model' entry): "
                        "pass checkpoint['model']")
    if kind == LIGHTNING:
        raise TypeError("state_dict looks like a Lightning checkpoint (espnet2.bin.lightning_train's *.ckpt): pass "
                        "its 'state_dict' entry, whose keys are under 'model.' (the LightningModule's child), with "
                        "that prefix removed, or convert the file with espnet-mha-convert")
    target = _unwrap(model)
    # A model whose own keys start with such segments (a child named ``module``, a compiled
    # submodule) takes the file's keys as they are: stripping them would lose its own names.
    clean = state_dict if strip_wrapper_prefixes(target.state_dict())[1] else strip_wrapper_prefixes(state_dict)[0]
    stock_targets = {}
    for prefix in fused_layers(clean):
        try:
            module = target.get_submodule(prefix[:-1])
        except AttributeError:
            continue
        if hasattr(module, "linear_q") and not hasattr(module, FUSED_PROJECTION):
            stock_targets[prefix] = None
    if stock_targets:
        _check_plain_fused(key for key in clean if key.startswith(tuple(stock_targets)))
        clean = _convert(clean, stock_targets, fuse=False)
    result = target.load_state_dict(clean, strict=strict)
    if clean and len(result.unexpected_keys) == len(clean):
        # Only reachable without strict: nothing was loaded (an audit loaded a Lightning
        # state_dict, keys under "model.", into the ESPnet model and got no word).
        logger.warning("load_stock_or_fused loaded nothing: no key of the state dict is the model's (e.g. %r; "
                       "the model has e.g. %r)", next(iter(clean)), next(iter(target.state_dict()), None))
    return result
