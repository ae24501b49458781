"""Stock <-> fused keys of one attention layer in a state dict (pure functions on the dict).

Stock ``MultiHeadedAttention`` keys: ``linear_q``, ``linear_k``, ``linear_v``,
``linear_out`` (``.weight`` ``(D, D)``, ``.bias`` ``(D,)``). Ours:
``linear_qkv`` (``.weight`` ``(3D, D)`` with rows q, k, v; ``.bias`` ``(3D,)``)
and the same ``linear_out``. Fusing is a concatenation, so the round trip is
bit-exact. The layer's load hook is in :mod:`espnet_mha.state_dict`; whole
state dicts in :mod:`espnet_mha.checkpoint`.
"""

from collections.abc import Mapping

import torch

from espnet_mha import checks

STOCK_PROJECTIONS = ("linear_q", "linear_k", "linear_v")
FUSED_PROJECTION = "linear_qkv"
PARAMS = ("weight", "bias")


def check_mapping(state_dict, name="state_dict"):
    """Raise ``TypeError`` unless ``state_dict`` is a mapping whose keys are names (strings)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{name} must be a mapping of names to tensors (a state dict), got {type(state_dict).__name__}")
    # A probe: an int key reached str methods and regexes deep inside ("'int' object has no attribute 'split'").
    key = next((key for key in state_dict if not isinstance(key, str)), None)
    if key is not None:
        raise TypeError(f"{name} must be a mapping of names to tensors (a state dict); its key {key!r} is a "
                        f"{type(key).__name__}, not a str")


def check_prefix(prefix):
    """Raise ``TypeError`` unless ``prefix`` (a layer's key prefix) is a string."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str (the layer's key prefix, e.g. 'decoder.decoder.layers.1.layer.', "
                        f"or '' for a bare layer), got {type(prefix).__name__} {prefix!r}")


def stock_keys(prefix):
    """The six stock q/k/v keys of the layer at ``prefix``."""
    return [f"{prefix}{name}.{param}" for name in STOCK_PROJECTIONS for param in PARAMS]


def fuse_keys(state_dict, prefix, *, n_feat=None):
    """Replace one layer's stock q/k/v keys by the fused key, in place.

    Args:
        state_dict: a (mutable) state dict.
        prefix: the layer's key prefix, e.g. ``"decoder.decoder.layers.1.layer."``.
        n_feat: if given, every stock tensor must be ``(n_feat, n_feat)`` /
            ``(n_feat,)``; if not, ``(D, D)`` / ``(D,)`` for one D.

    Returns:
        bool: whether the keys were converted (False if none were present).

    Raises:
        KeyError: only some of the six stock keys are present (names the missing
            ones), or stock and fused keys are both present.
        TypeError: ``state_dict`` is not a mapping, ``prefix`` not a string, or a
            q/k/v entry is not a tensor.
        ValueError: a tensor has the wrong shape (names key, expected, found), or
            the q/k/v parts differ in shape, dtype or device. The dict is then left
            as it was.
    """
    check_mapping(state_dict)
    check_prefix(prefix)
    if n_feat is not None:
        n_feat = checks.check_size("n_feat", n_feat)
    keys = stock_keys(prefix)
    present = [key for key in keys if key in state_dict]
    if not present:
        return False
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise KeyError(
            f"half-converted attention layer at {prefix!r}: has {present} but is missing {missing}"
        )
    fused = [f"{prefix}{FUSED_PROJECTION}.{param}" for param in PARAMS if f"{prefix}{FUSED_PROJECTION}.{param}" in state_dict]
    if fused:
        raise KeyError(f"attention layer at {prefix!r} has both stock keys and fused {fused}")
    for param in PARAMS:  # every check before the dict changes
        _check_stock_parts(state_dict, prefix, param, n_feat)
    size = state_dict[f"{prefix}{STOCK_PROJECTIONS[0]}.weight"].shape
    if n_feat is None and (len(size) != 2 or size[0] != size[1]):
        # The parts agree with each other; without n_feat nothing said they were a layer's (a
        # probe fused 1-D "weights" into a (3D,) linear_qkv.weight).
        raise ValueError(f"{prefix}{STOCK_PROJECTIONS[0]}.weight: expected a (D, D) weight, found {tuple(size)}")
    bias = state_dict[f"{prefix}{STOCK_PROJECTIONS[0]}.bias"].shape
    if tuple(bias) != tuple(size[:1]):
        raise ValueError(f"{prefix}{STOCK_PROJECTIONS[0]}.bias: expected shape {tuple(size[:1])} for the "
                         f"{tuple(size)} weight, found {tuple(bias)}")
    for param in PARAMS:
        parts = [state_dict.pop(f"{prefix}{name}.{param}") for name in STOCK_PROJECTIONS]
        # Detached: a state_dict(keep_vars=True) holds the parameters themselves, and a
        # result tied to their graph could not be deep-copied (a probe).
        state_dict[f"{prefix}{FUSED_PROJECTION}.{param}"] = torch.cat([p.detach() for p in parts], dim=0)
    return True


def _check_stock_parts(state_dict, prefix, param, n_feat):
    """Raise unless the q/k/v ``param`` tensors of the layer at ``prefix`` are tensors of one
    shape, dtype and device (``(n_feat, n_feat)`` / ``(n_feat,)`` when ``n_feat`` is given)."""
    names = [f"{prefix}{name}.{param}" for name in STOCK_PROJECTIONS]
    parts = [state_dict[name] for name in names]
    for name, part in zip(names, parts):
        if not isinstance(part, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(part).__name__}")
    if n_feat is not None:
        expected = (n_feat, n_feat) if param == "weight" else (n_feat,)
        for name, part in zip(names, parts):
            if tuple(part.shape) != expected:
                raise ValueError(f"{name}: expected shape {expected} for n_feat={n_feat}, found {tuple(part.shape)}")
    described = {(tuple(p.shape), p.dtype, p.device) for p in parts}  # one (D, D) / (D,) each
    if len(described) != 1:
        raise ValueError("the q/k/v parts differ in shape, dtype or device: " + ", ".join(
            f"{name} {tuple(p.shape)} {p.dtype} on {p.device}" for name, p in zip(names, parts)))


def unfuse_keys(state_dict, prefix):
    """Replace one layer's fused key by the stock q/k/v keys, in place.

    Returns:
        bool: whether the keys were converted (False if the fused key is absent).

    Raises:
        KeyError: only one of ``linear_qkv.weight``/``.bias`` is present, or stock
            q/k/v keys are there too (they would be overwritten).
        TypeError: ``state_dict`` is not a mapping, ``prefix`` not a string, or a
            fused entry is not a tensor.
        ValueError: the weight is not ``(3D, D)`` (its first dimension not divisible
            by 3, say), or weight and bias do not fit each other (the dict is then
            left as it was).
    """
    check_mapping(state_dict)
    check_prefix(prefix)
    fused = {param: f"{prefix}{FUSED_PROJECTION}.{param}" for param in PARAMS}
    present = [key for key in fused.values() if key in state_dict]
    if not present:
        return False
    both = [key for key in stock_keys(prefix) if key in state_dict]
    if both:  # fuse_keys and to_stock refuse these; unfusing replaced them without a word (a probe)
        raise KeyError(f"attention layer at {prefix!r} has both fused keys {present} and stock {both}")
    weight, bias = (state_dict[key] for key in fused.values()) if len(present) == len(fused) else (None, None)
    for key in present:
        _check_tensor(state_dict, key)
    if weight is not None and (weight.dim() != 2 or tuple(bias.shape) != (weight.size(0),)):
        raise ValueError(f"{fused['weight']} {tuple(weight.shape)} and {fused['bias']} {tuple(bias.shape)} "
                         f"are not a (3D, D) weight and its (3D,) bias")
    if len(present) != len(fused):
        missing = [key for key in fused.values() if key not in state_dict]
        raise KeyError(f"half-converted attention layer at {prefix!r}: missing {missing}")
    for key in fused.values():  # checked before any key is replaced: an error leaves the dict as it was
        _check_rows(state_dict, key)
    if weight.size(0) != 3 * weight.size(1):
        expected = (3 * weight.size(1), weight.size(1))
        raise ValueError(f"{fused['weight']}: expected shape (3D, D) = {expected}, found {tuple(weight.shape)}")
    for param in PARAMS:
        _split_fused(state_dict, prefix, param)
    return True


def _check_tensor(state_dict, key):
    if not isinstance(state_dict[key], torch.Tensor):
        raise TypeError(f"{key} must be a tensor, got {type(state_dict[key]).__name__}")


def _check_rows(state_dict, key):
    if state_dict[key].size(0) % 3:
        raise ValueError(f"{key}: first dimension {state_dict[key].size(0)} is not divisible by 3")


def _split_fused(state_dict, prefix, param):
    """Replace ``linear_qkv.<param>`` by its q, k and v rows under the stock keys (copies,
    detached as :func:`fuse_keys`'s)."""
    tensor = state_dict.pop(f"{prefix}{FUSED_PROJECTION}.{param}").detach()
    for name, part in zip(STOCK_PROJECTIONS, tensor.chunk(3, dim=0)):
        state_dict[f"{prefix}{name}.{param}"] = part.clone()


def unfuse_part(state_dict, prefix, param):
    """:func:`unfuse_keys` for a state dict that holds only ``linear_qkv.<param>`` (``param``:
    ``"weight"`` or ``"bias"``; a partial checkpoint).

    Raises:
        TypeError: the entry is not a tensor.
        ValueError: it is not a ``(3D, D)`` weight or a ``(3D,)`` bias.
    """
    key = f"{prefix}{FUSED_PROJECTION}.{param}"
    _check_tensor(state_dict, key)
    expected = 2 if param == "weight" else 1
    if state_dict[key].dim() != expected:
        raise ValueError(f"{key}: expected a {'(3D, D) weight' if expected == 2 else '(3D,) bias'}, "
                         f"got shape {tuple(state_dict[key].shape)}")
    _check_rows(state_dict, key)
    _split_fused(state_dict, prefix, param)
