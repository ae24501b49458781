"""What tells the current weights of a key/value projection the layer calls as modules
(LoRA, hooks, parametrizations, pruning, quantized swaps): the decoding cache's record of
them (see :func:`espnet_mha.cache_records.record`), compared at each step to decide
whether a cache made through those modules may be reused.

A plain ``nn.Linear`` is keyed by its weight and bias alone
(:func:`espnet_mha.cache_records.weights_key`); a called module may compute differently
after any change to its parameters, buffers, hooks or attributes, which this key follows.
"""

from types import SimpleNamespace

import torch
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from espnet_mha import cache, cache_records, quantized

_SETTING_TYPES = (bool, int, float, str, type(None))
# What every nn.Module keeps in its __dict__ besides its training flag (parameters,
# buffers, children and hooks are keyed on their own in modules_key).
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}


def modules_key(layer, modules):
    """What tells the current weights of the key/value projection's ``modules`` when the
    layer calls them (the decoding cache's record, see :func:`espnet_mha.cache_records.record`):
    how many times the layer made its projections (a new module, new quantized weights),
    the optimizer steps taken (:func:`espnet_mha.cache_records.optimizer_steps`), the addresses,
    strides and write counters of the modules' parameters (LoRA's, a parametrization's
    originals) and buffers (a pruning mask, ``spectral_norm``'s vectors, a
    parametrization's constants), and the hooks and other attributes (settings, tensors,
    and containers of those: :func:`_attribute_key`) of the modules and their children."""
    quantized.projections(layer)
    subtree = [child for module in modules for child in module.modules()]
    return (layer.__dict__["_projections_made"], cache_records.optimizer_steps(),
            tuple((t.data_ptr(), t.stride(), cache.write_counter(t))
                  for module in modules for t in (*module.parameters(), *module.buffers())),
            tuple(hook for child in subtree for hook in child._forward_pre_hooks),
            tuple(hook for child in subtree for hook in child._forward_hooks),
            # Settings that change what a module computes (LoRA's scale, an adapter switched
            # off: 1.4e-2 off when a cache was reused across such a change; a tensor kept as a
            # plain attribute, peft's dict of scales: 0.19 off, found by a probe).
            tuple(pair for child in subtree for pair in _attributes(child)))


def _attributes(module):
    """``(name, _attribute_key(value))`` of ``module``'s own attributes: not the
    ``nn.Module`` internals, nor what its hooks recompute (:func:`_recomputed`)."""
    recomputed = _recomputed(module)
    return [(name, _attribute_key(value)) for name, value in module.__dict__.items()
            if name not in _MODULE_INTERNALS and name not in recomputed]


def _recomputed(module):
    """Names of the tensors that torch's pruning, ``weight_norm`` and ``spectral_norm``
    hooks set on ``module`` before each call from its parameters and buffers (keyed
    already): a new tensor each call, which would make every step recompute the cache."""
    names = ()
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            names += (hook._tensor_name,)
        elif isinstance(hook, (WeightNorm, SpectralNorm)):
            names += (hook.name,)
    return names


def _attribute_key(value):
    """What :func:`modules_key` compares of a module attribute: a setting (bool, number,
    string, None) as it is; a tensor by address, strides, shape, dtype and write counter;
    a list, tuple, set, dict or ``SimpleNamespace`` of those item by item (one level);
    anything else (a function, an object of the module's own) not at all (``NotImplemented``)."""
    if isinstance(value, SimpleNamespace):
        value = vars(value)
    if isinstance(value, dict):  # OrderedDict, defaultdict too
        return tuple((k, _item_key(v)) for k, v in value.items() if type(k) in _SETTING_TYPES)
    if isinstance(value, (list, tuple)):
        return tuple(map(_item_key, value))
    if isinstance(value, (set, frozenset)):
        return frozenset(map(_item_key, value))
    return _item_key(value)


def _item_key(value):
    """:func:`_attribute_key` of a setting or a tensor; ``NotImplemented`` for anything else."""
    if type(value) in _SETTING_TYPES:
        return value
    if isinstance(value, torch.Tensor):
        try:
            return value.data_ptr(), value.stride(), tuple(value.shape), value.dtype, cache.write_counter(value)
        except (RuntimeError, NotImplementedError):  # no storage (a subclass, meta): its identity
            return id(value)
    return NotImplemented
