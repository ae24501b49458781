"""Argument checks at the layer's public boundary, with messages that name the
argument, the values received and the rule."""

import torch


def autocast_dtype(device_type):
    """The autocast dtype active for ``device_type``, or None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (meta...)
        pass
    return None


def compute_dtype(x):
    """The dtype a linear layer computes in for ``x``: the autocast dtype under
    autocast, except for float64, which autocast never casts."""
    autocast = autocast_dtype(x.device.type)
    return x.dtype if autocast is None or x.dtype == torch.float64 else autocast


def check_size(name, value):
    """Raise unless ``value`` is a positive int (bools refused).

    Raises:
        TypeError: not an int.
        ValueError: not positive.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def check_features(name, x, ndim, layout, *, n_feat, weight):
    """Raise unless ``x`` is a floating ``ndim``-D tensor with ``n_feat`` features
    that a layer with parameter ``weight`` can take (device, dtype or autocast).

    Args:
        name: the argument's name, for messages.
        x: the tensor.
        ndim, layout: expected rank and its description, e.g. ``3, "(B, T1, D)"``.
        n_feat: D.
        weight: one of the layer's parameters.

    Raises:
        TypeError: not a tensor, not floating point, or a dtype the layer cannot take.
        ValueError: wrong rank, feature size or device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.shape[-1] != n_feat:
        raise ValueError(
            f"{name} has feature size {x.shape[-1]} (shape {tuple(x.shape)}), expected n_feat={n_feat}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but the layer's parameters are on {weight.device}")
    if x.dtype != weight.dtype and compute_dtype(x) != compute_dtype(weight):
        raise TypeError(
            f"{name} dtype {x.dtype} != the layer's parameter dtype {weight.dtype} "
            f"(convert one of them; torch.autocast casts float32/16 but never float64)"
        )


def check_same_batch(query, memory):
    """Raise ``ValueError`` unless memory and query have the same batch size."""
    if memory.size(0) != query.size(0):
        raise ValueError(
            f"memory batch {memory.size(0)} (shape {tuple(memory.shape)}) != query batch "
            f"{query.size(0)} (shape {tuple(query.shape)})"
        )
