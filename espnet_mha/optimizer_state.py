"""An ESPnet training checkpoint's optimizer state, between the stock and the fused layout.

A ``torch.optim`` state dict indexes parameters by their position in the list the
optimizer was built with; ESPnet builds it from ``model.parameters()``. Fusing a
layer's ``linear_q/k/v`` (six parameters) into ``linear_qkv`` (two) shifts every
later position, so a stock run's ``checkpoint.pth`` does not fit a ``flash_mha``
model (``optimizer.load_state_dict`` raises) and the other way round.

The file does not say which position is which parameter. The model's state dict
lists parameters and buffers in ``named_parameters`` order, interleaved; what the
optimizer state adds is the shape of each parameter's per-element statistics
(Adam's ``exp_avg``). :func:`convert_optimizer_state` finds every way of picking
the parameters from the state dict entries that fits those shapes (our layers'
projections are parameters for sure) and converts only when all of them give the
same converted state: they put each converted layer at the same position, or the
positions they leave open hold no state (a frozen decoder), or every parameter's
state is the same scalars (torch 1.x SGD); else it refuses (pass
``--drop-optimizer-state``). This needs every parameter in the model state:
a parameter with no optimizer state (frozen, unused) is trusted only where the
caller knows that the file holds it (ESPnet's ``--use_adapter`` with
``--save_strategy required_grad_only`` leaves frozen parameters out).

Only element-wise optimizers convert (Adam, AdamW, SGD, RMSprop, Adagrad,
Adadelta, Adamax, NAdam, RAdam...): each per-parameter value must be None, a
number, a scalar tensor, or a tensor of the parameter's shape. Their q, k and v
statistics are then exactly the row blocks of the fused parameter's, so a
resumed run continues as the original would have. Scalars (``step``) must agree
across q, k and v. Factored or whole-matrix state (Adafactor, L-BFGS), several
parameter groups (ESPnet's ``--exclude_weight_decay``) and states that name their
parameters are refused; so are several optimizers, by :mod:`espnet_mha.convert`.
"""

import torch

from espnet_mha.checkpoint_io import ConversionError
from espnet_mha.fused_keys import FUSED_PROJECTION, PARAMS, STOCK_PROJECTIONS


def convert_optimizer_state(state, model_state, layers, *, fuse, complete=False, where="optimizer state"):
    """``state`` (an optimizer's ``state_dict()``) for the model after converting ``layers``.

    Args:
        state: the optimizer state dict as saved with ``model_state``.
        model_state: the model's state dict in the layout ``state`` was saved with
            (wrapper prefixes stripped, key order as saved).
        layers: key prefixes of the layers to convert (``"...layers.1.layer."``).
        fuse: True: stock -> fused; False: fused -> stock.
        complete: ``model_state`` is known to hold every parameter (ESPnet's default
            ``save_strategy``; with ``--use_adapter`` it may leave frozen ones out). Where
            it is not known, a parameter with no optimizer state (frozen, or never used)
            could be one the file left out, and the search could fill its place with a
            buffer of the same shape: such a state is refused.
        where: how messages name ``state``.

    Returns:
        A new optimizer state dict (the input is not modified).

    Raises:
        ConversionError: the state cannot be converted exactly; the message says why.
    """
    groups, per_param = _check_structure(state, where)
    n_params = len(groups[0]["params"])
    old, new = (STOCK_PROJECTIONS, (FUSED_PROJECTION,)) if fuse else ((FUSED_PROJECTION,), STOCK_PROJECTIONS)
    owned = {key for prefix in layers for key in _layer_keys(prefix, old)}
    missing = sorted(owned - set(model_state))
    if missing:
        raise ConversionError(f"{where}: the model state has no {', '.join(missing[:3])}")
    width, new_width = len(old) * len(PARAMS), len(new) * len(PARAMS)  # a layer's parameters: 6 stock, 2 fused
    if n_params < width * len(layers):
        raise ConversionError(f"{where}: {n_params} parameters, fewer than the {len(layers)} layer(s) to convert "
                              f"have ({width} each): it was not saved with this model")
    if not per_param:  # no per-parameter state (plain SGD, or before the first step): only the count changes
        group = dict(groups[0])
        group["params"] = list(range(n_params + len(layers) * (new_width - width)))
        return {**state, "param_groups": [group]}
    shapes = [_param_shape(per_param.get(index), index, where) for index in range(n_params)]
    stateless = [index for index in range(n_params) if not per_param.get(index)]
    if stateless and not complete:
        raise ConversionError(
            f"{where}: {len(stateless)} parameter(s) have no state (frozen or unused: positions "
            f"{stateless[:5]}{'...' if len(stateless) > 5 else ''}), and nothing says that the model state holds "
            "them: ESPnet's --use_adapter with --save_strategy required_grad_only leaves frozen parameters out, "
            "and their places could then be taken by buffers of the same shapes. Keep the config.yaml ESPnet "
            "wrote beside the checkpoint (it tells)")
    entries = _entries(model_state)
    starts = _layer_starts(entries, shapes, owned, layers, old, per_param, where)
    moved, out_index, i = {}, 0, 0
    while i < n_params:
        prefix = starts.get(i)
        if prefix is None:
            if i in per_param:
                moved[out_index] = per_param[i]
            out_index, i = out_index + 1, i + 1
            continue
        olds = [per_param.get(i + k) for k in range(width)]
        for k, value in enumerate(_convert_layer(olds, fuse, prefix, where)):
            if value is not None:
                moved[out_index + k] = value
        out_index, i = out_index + new_width, i + width
    group = dict(groups[0])
    group["params"] = list(range(out_index))
    return {**state, "state": moved, "param_groups": [group]}


def _layer_keys(prefix, projections):
    """A layer's parameter keys in registration order: each projection's weight, then bias."""
    return [f"{prefix}{name}.{param}" for name in projections for param in PARAMS]


def _layer_starts(entries, shapes, owned, layers, old, per_param, where):
    """{position of the layer's first parameter: prefix} for each layer in ``layers``,
    whose parameters in the old layout (``old`` projections, weight then bias) must be
    consecutive entries of the model state.

    Where the shapes leave a layer's position open, the converted state can still be the
    same whichever position it holds, and then it converts: the layer's parameters have no
    state at any of them and no parameter with state lies between them (a frozen decoder
    after a trained encoder), or every parameter's state is the same scalars (torch 1.x
    SGD's ``momentum_buffer: None``)."""
    keys = [key for key, _ in entries]
    index = {key: i for i, key in enumerate(keys)}
    firsts = {}
    for prefix in layers:
        expected = _layer_keys(prefix, old)
        at = index.get(expected[0])
        if at is None or keys[at:at + len(expected)] != expected:
            raise ConversionError(f"{where}: the model state does not list {', '.join(expected)} in this order "
                                  "and next to each other, as the layer registers them")
        firsts[expected[0]] = prefix
    candidates = _positions(entries, shapes, owned, set(firsts), where)
    width = len(old) * len(PARAMS)
    open_keys = [key for key, found in candidates.items() if len(found) > 1]
    if open_keys and not _alike(per_param, len(shapes)) and not all(
            _stateless_between(candidates[key], width, per_param) for key in open_keys):
        key = open_keys[0]
        raise ConversionError(
            f"{where}: cannot tell which optimizer position holds {key} (possible: {candidates[key][:6]}): buffers "
            "and parameters of the same shapes before it leave it open, and the converted state would differ")
    # Any reading gives the same state; the first possible position of each layer is one reading.
    return {candidates[key][0]: prefix for key, prefix in firsts.items()}


def _stateless_between(found, width, per_param):
    """True if the positions ``found[0]`` .. ``found[-1] + width - 1`` hold no state: the
    converted state is then the same whichever of ``found`` a layer starts at."""
    return not any(found[0] <= index < found[-1] + width for index in per_param)


def _alike(per_param, n_params):
    """True if every one of the ``n_params`` parameters has the same state, of scalars only."""
    values = [per_param.get(index) for index in range(n_params)]
    first = values[0]
    return isinstance(first, dict) and all(
        isinstance(value, dict) and value.keys() == first.keys() and not any(map(_is_param_tensor, value.values()))
        and all(_same(first[key], value[key]) for key in first) for value in values)


def _check_structure(state, where):
    """(param_groups, {index: per-parameter state}) of a plain ``torch.optim`` state dict."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        raise ConversionError(f"{where}: not a torch.optim state dict (no 'state' dict and 'param_groups' list; "
                              f"got {type(state).__name__}"
                              + (f" with keys {sorted(map(str, state))}" if isinstance(state, dict) else "") + ")")
    groups = state["param_groups"]
    if len(groups) != 1:
        raise ConversionError(
            f"{where}: {len(groups)} parameter groups (ESPnet's --exclude_weight_decay makes two, ordered by "
            "name): only an optimizer built from model.parameters() in one group can be mapped to the "
            "parameters")
    params = groups[0].get("params")
    if not isinstance(params, list) or params != list(range(len(params))):
        raise ConversionError(f"{where}: the parameter group's 'params' are not the positions 0..N-1 "
                              f"(got {params if not isinstance(params, list) else params[:8]}...)")
    if "param_names" in groups[0]:
        names = groups[0]["param_names"]
        long = isinstance(names, (list, tuple)) and len(names) > 4
        raise ConversionError(f"{where}: the parameter group names its parameters ('param_names': "
                              f"{names[:4] if long else names!r}{'...' if long else ''}), which this "
                              "conversion does not rename")
    per_param = state["state"]
    stray = [k for k in per_param if not isinstance(k, int) or not 0 <= k < len(params)]
    if stray:
        raise ConversionError(f"{where}: state for positions {stray[:5]} outside the parameter group "
                              f"(0..{len(params) - 1})")
    return groups, per_param


def _param_shape(values, index, where):
    """The parameter shape that ``values`` (one parameter's optimizer state) implies, or
    None (no state, or scalars only); raises for state that is not element-wise."""
    if values is None:
        return None
    if not isinstance(values, dict):
        raise ConversionError(f"{where}: the state of parameter {index} is a {type(values).__name__}, not a dict")
    shapes = {}
    for key, value in values.items():
        if value is None or isinstance(value, (int, float, bool)):
            continue
        if not hasattr(value, "shape") or not hasattr(value, "dim"):
            raise ConversionError(f"{where}: parameter {index}'s {key!r} is a {type(value).__name__}: only "
                                  "element-wise optimizer state (tensors of the parameter's shape, scalars) "
                                  "converts")
        if value.dim() > 0:
            shapes[key] = tuple(value.shape)
    if len(set(shapes.values())) > 1:
        raise ConversionError(
            f"{where}: parameter {index}'s state holds tensors of different shapes "
            f"({', '.join(f'{k} {list(s)}' for k, s in shapes.items())}), as a factored or whole-matrix "
            "optimizer (Adafactor, L-BFGS) keeps: only element-wise state converts")
    return next(iter(shapes.values()), None)


def _entries(model_state):
    """The model state's distinct tensors in key order: ``[(key, shape)]``. A tensor saved
    under two names (tied weights) is one parameter to ``model.parameters()``; it is kept
    under its first name."""
    seen, out = set(), []
    for key, value in model_state.items():
        if not hasattr(value, "shape"):
            continue
        identity = _identity(value)
        if identity is not None:
            if identity in seen:
                continue
            seen.add(identity)
        out.append((key, tuple(value.shape)))
    return out


def _identity(tensor):
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), tensor.dtype) if tensor.numel() else None
    except (RuntimeError, NotImplementedError):  # no storage (meta, wrapper subclasses)
        return None


def _positions(entries, shapes, forced, wanted, where):
    """{key: [position, ...]} for each key in ``wanted``: the positions in the optimizer's
    parameter list it holds in the ways of choosing ``len(shapes)`` parameters from
    ``entries`` (in order) whose shapes fit ``shapes`` (None fits any) and that
    include every key in ``forced``. Raises if there is no such way.

    Bit sets over positions: ``ahead[i]`` holds j when the first i entries can be the
    first j parameters; ``behind[i]`` holds j when entries i.. can be parameters j..."""
    n, m = len(shapes), len(entries)
    fits = {}
    for j, shape in enumerate(shapes):
        fits.setdefault(shape, 0)
        fits[shape] |= 1 << j
    unknown = fits.get(None, 0)
    # An entry fits the parameters of its shape and those with no shape known.
    masks = [unknown | fits.get(shape, 0) for _, shape in entries]
    must = [key in forced for key, _ in entries]
    ahead = [1]
    for i in range(m):
        reach = ahead[-1]
        ahead.append((0 if must[i] else reach) | ((reach & masks[i]) << 1))
    if not ahead[-1] >> n & 1:
        raise ConversionError(
            f"{where}: its {n} parameters' shapes do not fit the model state's entries in order (was it saved "
            "with this model, by an optimizer built from model.parameters()?)")
    behind = [0] * m + [1 << n]
    for i in range(m - 1, -1, -1):
        reach = behind[i + 1]
        behind[i] = (0 if must[i] else reach) | ((reach >> 1) & masks[i])
    out = {}
    for i, (key, _) in enumerate(entries):
        if key not in wanted:
            continue
        possible = ahead[i] & masks[i] & (behind[i + 1] >> 1)
        out[key] = [j for j in range(n) if possible >> j & 1]
    return out


def _convert_layer(values, fuse, prefix, where):
    """One layer's per-parameter states in the old layout -> the new layout's, in order.
    Stock order: q.weight, q.bias, k.weight, k.bias, v.weight, v.bias; fused: qkv.weight, qkv.bias."""
    if fuse:
        out = []
        for param in range(len(PARAMS)):
            parts = values[param::len(PARAMS)]  # q, k, v of this parameter
            if all(p is None for p in parts):
                out.append(None)
                continue
            if any(p is None for p in parts) or len({frozenset(p) for p in parts}) != 1:
                raise ConversionError(f"{where}: {prefix}linear_q/k/v.{PARAMS[param]} have unlike state "
                                      f"({[None if p is None else sorted(p) for p in parts]}): cannot fuse it")
            merged = {}
            for key in parts[0]:
                items = [p[key] for p in parts]
                if _is_param_tensor(items[0]):
                    merged[key] = torch.cat(items)
                elif all(_same(items[0], item) for item in items[1:]):
                    merged[key] = items[0]
                else:
                    raise ConversionError(f"{where}: {prefix}linear_q/k/v.{PARAMS[param]} disagree in "
                                          f"{key!r} ({items}): cannot fuse it")
            out.append(merged)
        return out
    out = [None] * 6
    for param, values_of in enumerate(values):
        if values_of is None:
            continue
        for part in range(3):
            out[part * len(PARAMS) + param] = {
                key: (value.chunk(3)[part].clone() if _is_param_tensor(value)
                      else value.clone() if isinstance(value, torch.Tensor) else value)
                for key, value in values_of.items()}
    return out


def _is_param_tensor(value):
    return hasattr(value, "dim") and value.dim() > 0


def _same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and bool(torch.equal(a, b))
    return a == b
