"""Argument checks at the layer's public boundary, with messages that name the
argument, the values received and the rule."""

import numbers

import torch
from torch.autograd import forward_ad


def autocast_dtype(device_type):
    """The autocast dtype active for ``device_type``, or None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (meta...)
        pass
    return None


def forward_ad_active():
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``)."""
    return getattr(forward_ad, "_current_level", -1) >= 0


def compute_dtype(x):
    """The dtype a linear layer computes in for ``x``: the autocast dtype under
    autocast, except for float64, which autocast never casts."""
    autocast = autocast_dtype(x.device.type)
    return x.dtype if autocast is None or x.dtype == torch.float64 else autocast


def option_word(value):
    """A string option as it is compared: without surrounding spaces, lower case (a YAML
    config's ``backend: SDPA`` was refused where ``ESPNET_MHA_BACKEND=SDPA`` was taken); any
    other value as it is."""
    return value.strip().lower() if isinstance(value, str) else value


def check_size(name, value):
    """A positive integer size as an ``int`` (numpy integers accepted, bools refused).

    Raises:
        TypeError: not an integer.
        ValueError: not positive.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def check_probability(name, value):
    """A probability in [0, 1] as a ``float``: what ``float()`` takes, as the stock
    ``nn.Dropout`` takes it (numpy floats, a one-element tensor), but no bool or string.

    Raises:
        TypeError: not a real number.
        ValueError: outside [0, 1] (or NaN).
    """
    try:
        number = None if isinstance(value, (bool, str, bytes)) or _is_numpy_bool(value) else float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        number = None
    if number is None:
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {number}")
    return number


def _is_numpy_bool(value):
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


# The precision fp32 matmuls run at: torch.set_float32_matmul_precision("medium") runs the
# CPU's (oneDNN) fp32 batched matmuls in bf16 and CUDA's in tf32. A decoding cache's
# record keeps it: keys projected under one setting were reused under another, 3.7e-4
# off the stock step (found by a probe).
if hasattr(torch._C, "_get_fp32_precision_getter"):  # torch >= 2.9: per backend
    _fp32_precision = torch._C._get_fp32_precision_getter

    def matmul_precision():
        """The fp32 matmul precision of the CPU's and CUDA's matmuls (about 0.4 us)."""
        return _fp32_precision("mkldnn", "matmul"), _fp32_precision("cuda", "matmul")
else:
    def matmul_precision():
        """The fp32 matmul precision (``torch.get_float32_matmul_precision``)."""
        return torch.get_float32_matmul_precision()


ENV_TRUE, ENV_FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name, value, extra=()):
    """An environment variable's on/off value (any case, spaces stripped): True for
    1/true/yes/on, False for 0/false/no/off, or one of ``extra`` as written (lower case).

    Raises:
        ValueError: anything else, naming the variable and the values it takes.
    """
    given = value.strip().lower()
    if given in ENV_TRUE:
        return True
    if given in ENV_FALSE:
        return False
    if given in extra:
        return given
    allowed = "/".join(ENV_FALSE[:1] + ENV_TRUE[:1] + tuple(extra))
    raise ValueError(f"{name}={value!r} must be {allowed} (or true/false, yes/no, on/off)")


def check_flag(name, value):
    """An on/off option as a ``bool`` (bools, numpy bools, the ints 0/1, and None, a YAML
    ``null``, as off; a string such as "false" is refused rather than read as true).

    Raises:
        TypeError: anything else.
    """
    if value is None or isinstance(value, bool) or _is_numpy_bool(value) or (isinstance(value, numbers.Integral)
                                                                            and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_features(name, x, ndim, layout, *, n_feat, weight, feature_dim=-1):
    """Raise unless ``x`` is a floating ``ndim``-D tensor with ``n_feat`` features
    that a layer with parameter ``weight`` can take (device, dtype or autocast).

    Args:
        name: the argument's name, for messages.
        x: the tensor.
        ndim, layout: expected rank and its description, e.g. ``3, "(B, T1, D)"``.
        n_feat: D.
        feature_dim: where D is (1 for a transposed ``(B, D, T1)`` query).
        weight: one of the layer's parameters.

    Raises:
        TypeError: not a tensor (also a torch.fx Proxy: the layer does not trace
            symbolically), not floating point, or a dtype the layer cannot take.
        ValueError: wrong rank, feature size or device.
    """
    if not isinstance(x, torch.Tensor):
        if isinstance(x, torch.fx.Proxy):
            raise TypeError(
                f"{name} is a torch.fx Proxy: torch.fx.symbolic_trace cannot trace into "
                "FlashMultiHeadedAttention (its kernel choice reads sizes); keep it a leaf module "
                "(a Tracer whose is_leaf_module returns True for it), or use torch.export or torch.jit.trace"
            )
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_dense(name, x)
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.shape[feature_dim] != n_feat:
        raise ValueError(
            f"{name} has feature size {x.shape[feature_dim]} (shape {tuple(x.shape)}, {layout}), "
            f"expected n_feat={n_feat}"
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


def check_dense(name, x):
    """Raise ``TypeError`` unless tensor ``x`` is dense (strided): sparse layouts reach no
    kernel, and a nested tensor (strided too, but without sizes) no check."""
    if x.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor of {x.size(0)} items "
                        f"(layout {x.layout}); pad it (torch.nested.to_padded_tensor) and pass a mask")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout} (shape {tuple(x.shape)}); "
                        "convert it with .to_dense()")


def dense_rows(query):
    """A 2-D ``(B, D)`` query as a dense tensor: the stock layer takes a sparse one (its
    ``nn.Linear`` projections do, and return dense rows), so ours does too."""
    return query.to_dense() if query.layout != torch.strided else query


def check_same_batch(query, memory):
    """Raise ``ValueError`` unless memory and query have the same batch size."""
    if memory.size(0) != query.size(0):
        raise ValueError(
            f"memory batch {memory.size(0)} (shape {tuple(memory.shape)}) != query batch "
            f"{query.size(0)} (shape {tuple(query.shape)})"
        )


def one_frame(memory, batch):
    """A 2-D ``(N, D)`` memory as the stock layer reads it for a query batch of ``batch``
    (its keys ``view(batch, -1, H, d_k)``): ``(B, 1, D)``, one frame per item, when
    ``N == batch``; ``(1, N, D)``, an unbatched memory, when ``batch == 1``; otherwise
    ``(batch, N / batch, D)`` where ``batch`` divides ``N``. Anything else is returned as it
    is (a 2-D memory then fails the memory check, which names its shape)."""
    if not isinstance(memory, torch.Tensor) or memory.dim() != 2:
        return memory
    rows = memory.size(0)
    if rows == batch:
        return memory.unsqueeze(1)
    if batch == 1:
        return memory.unsqueeze(0)
    if batch > 0 and rows % batch == 0:
        return memory.reshape(batch, rows // batch, memory.size(1))
    return memory


def check_read_as_frames(name, x, batch):
    """Raise for a 2-D ``x`` that :func:`one_frame` could not read for a query batch of ``batch``
    (its rows not a multiple of the batch, nor a batch-1 query).

    Raises:
        ValueError: names the tensor, its shape and the rule.
    """
    if isinstance(x, torch.Tensor) and x.dim() == 2:
        raise ValueError(f"{name} of shape {tuple(x.shape)}: a 2-D {name} needs a multiple of the query batch "
                         f"B={batch} rows (read as (B, N / B, D), as the stock layer reads it), or a batch-1 query")


def check_cache(state, what, *, batch, n_head, d_k, dtype=None, device=None, device_name=""):
    """Raise unless ``state`` is a ``(1 or batch, 2, n_head, t, d_k)`` decoding cache (see
    :mod:`espnet_mha.cache`; and, where given, of ``dtype`` on ``device``). ``batch=None``:
    any batch (the caller decides what a batch that does not fit means).

    Raises:
        TypeError: not a tensor, or not a dense one.
        ValueError: its shape, batch, dtype or device does not fit; ``what`` says which cache.
    """
    if not isinstance(state, torch.Tensor):
        raise TypeError(
            f"state must be None or the (b, 2, n_head, T, d_k) cache a previous step returned, "
            f"got {type(state).__name__}"
        )
    if state.is_nested or state.layout != torch.strided:
        got = f"a nested tensor (layout {state.layout})" if state.is_nested else f"layout {state.layout}"
        raise TypeError(f"state {what}: it must be a dense (strided) tensor, got {got}")
    problems = []
    if state.dim() != 5 or state.size(1) != 2 or state.size(2) != n_head or state.size(4) != d_k:
        batches = "b" if batch is None else f"1 or {batch}"
        problems.append(f"shape {tuple(state.shape)} is not ({batches}, 2, {n_head}, t, {d_k})")
    elif batch is not None and state.size(0) != 1 and state.size(0) != batch:
        problems.append(f"batch {state.size(0)} is neither 1 nor the query batch {batch}")
    if dtype is not None and state.dtype != dtype:
        problems.append(f"dtype {state.dtype} != {dtype}")
    if device is not None and state.device != device:
        problems.append(f"device {state.device} != {device_name} {device}")
    if problems:
        raise ValueError(f"state {what}: " + "; ".join(problems))


def check_self_cache(state, *, batch, n_head, d_k, dtype, device):
    """Check a causal self-attention cache ``(b, 2, H, t, d_k)``.

    Raises:
        TypeError: state is not a tensor.
        ValueError: its shape, batch, dtype or device does not match the query.
    """
    check_cache(state, "is not a self-attention cache for this query", batch=batch,
                n_head=n_head, d_k=d_k, dtype=dtype, device=device, device_name="query device")
