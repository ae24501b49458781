"""Where our layers are among a whole model's state-dict keys, and the key prefixes that
wrappers add (``module.`` for DDP and DataParallel, ``_orig_mod.`` for ``torch.compile``).

A model's state dict holds our layers among other modules, some with the same key
names (a transformer encoder's ``linear_q/k/v``): :func:`stock_layers` finds the
attention layers of ESPnet's ``SequenceModel`` (``S4Decoder``) by their key prefix,
:func:`fused_layers` finds ours by their ``linear_qkv``. Converting them is
:mod:`espnet_mha.checkpoint`'s.
"""

import re
from collections import OrderedDict

from espnet_mha.fused_keys import FUSED_PROJECTION, check_mapping

# The key prefix of an attention layer inside ESPnet's SequenceModel (S4Decoder):
# SequenceModel.layers[i] is a SequenceResidualBlock whose `layer` is the attention,
# e.g. "decoder.decoder.layers.1.layer.". A transformer/conformer encoder's
# attention ("encoder.encoders.0.self_attn.") does not match. The empty prefix does:
# top-level linear_q/k/v keys are one bare layer's state dict.
DEFAULT_LAYER_PATTERN = r"^$|(?:^|\.)layers\.\d+\.layer\.$"
COMPILE_SEGMENT = "_orig_mod"  # torch.compile's OptimizedModule (pytorch #101107)
PARALLEL_SEGMENT = "module"  # DistributedDataParallel / DataParallel
# A q/k/v key of either layout: groups (prefix, projection, parameter) and (prefix, parameter).
STOCK_KEY = re.compile(r"^((?:.*\.)?)(linear_q|linear_k|linear_v)\.(weight|bias)$")
FUSED_KEY = re.compile(r"^((?:.*\.)?)linear_qkv\.(weight|bias)$")
# Keys of a fused projection that is not a plain nn.Linear (quantized, parametrized, adapted),
# and of a stock one (group 2: which projection).
FUSED_OTHER = re.compile(r"^((?:.*\.)?)linear_qkv\.(?!(?:weight|bias)$)")
STOCK_OTHER = re.compile(r"^((?:.*\.)?)(linear_q|linear_k|linear_v)\.(?!(?:weight|bias)$)")


def strip_wrapper_prefixes(state_dict):
    """Remove the key prefixes that ``torch.compile``, DDP and DataParallel add.

    ``_orig_mod.`` (``torch.compile``, pytorch #101107) is removed wherever it is
    a whole path segment, so a compiled submodule (``decoder._orig_mod.``) is
    covered too; ``module.`` (DDP, DataParallel) is removed from the front while
    every key starts with it. Both repeat, in either order.

    Args:
        state_dict: a model's state dict.

    Returns:
        (state_dict, stripped): a new ``OrderedDict`` (same tensors and order,
        ``_metadata`` renamed alike) and the prefixes removed, outermost first,
        e.g. ``["module.", "_orig_mod."]``; empty when the keys were clean.

    Raises:
        TypeError: ``state_dict`` is not a mapping.
        ValueError: two keys become the same key (names both).
    """
    check_mapping(state_dict)
    wrappers = (COMPILE_SEGMENT, PARALLEL_SEGMENT)
    parts = [key.split(".") for key in state_dict]
    peeled = []
    while parts:
        depth = len(peeled)
        head = parts[0][depth] if len(parts[0]) > depth + 1 else None
        if head not in wrappers or any(len(p) <= depth + 1 or p[depth] != head for p in parts):
            break
        peeled.append(head)

    def clean(segments):
        if segments[: len(peeled)] == peeled[: len(segments)]:
            segments = segments[len(peeled):]
        return ".".join(s for s in segments if s != COMPILE_SEGMENT)

    stripped = [f"{segment}." for segment in dict.fromkeys(peeled)]
    out, source = OrderedDict(), {}
    for key, segments in zip(state_dict, parts):
        new = clean(segments)
        if new in source:
            raise ValueError(f"keys {source[new]!r} and {key!r} both become {new!r} without wrapper prefixes")
        if COMPILE_SEGMENT in segments[len(peeled):] and f"{COMPILE_SEGMENT}." not in stripped:
            stripped.append(f"{COMPILE_SEGMENT}.")
        source[new] = key
        out[new] = state_dict[key]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict((clean(name.split(".") if name else []), value) for name, value in metadata.items())
    return out, stripped


def _compile_pattern(layer_pattern):
    if layer_pattern is None or isinstance(layer_pattern, re.Pattern):
        return layer_pattern
    try:
        return re.compile(layer_pattern)
    except (re.error, TypeError) as error:
        raise ValueError(f"layer_pattern {layer_pattern!r} is not a valid regular expression: {error}") from None


def _layer_prefixes(state_dict, key_re, layer_pattern=None):
    pattern = _compile_pattern(layer_pattern)
    prefixes = {}
    for key in state_dict:
        match = key_re.match(key)
        if match and (pattern is None or pattern.search(match.group(1))):
            prefixes[match.group(1)] = None
    return list(prefixes)


def stock_layers(state_dict, *, layer_pattern=DEFAULT_LAYER_PATTERN):
    """Key prefixes of the layers with any stock ``linear_q/k/v`` key, in key order.

    Args:
        state_dict: a model's state dict.
        layer_pattern: keep prefixes where this regular expression matches
            (``re.search``); None keeps every layer (an encoder's attention too).

    Returns:
        list of prefixes such as ``"decoder.decoder.layers.1.layer."``.

    Raises:
        ValueError: ``layer_pattern`` is not a valid regular expression.
    """
    return _layer_prefixes(state_dict, STOCK_KEY, layer_pattern)


def fused_layers(state_dict):
    """Key prefixes of the layers with a fused ``linear_qkv`` key (only our layer has one)."""
    return _layer_prefixes(state_dict, FUSED_KEY)


def fused_modules(model):
    """``(name, layer)`` for each of our layers in ``model`` with the fused ``linear_qkv``, in
    ``named_modules()`` order: the model's counterpart of :func:`fused_layers`."""
    from espnet_mha.layer import FlashMultiHeadedAttention  # lazy: reading keys needs no layer

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, FlashMultiHeadedAttention) and FUSED_PROJECTION in module._modules]
