"""ESPnet's ``--init_param`` with ``--ignore_init_mismatch true`` across the two layouts.

ESPnet's ``load_pretrained_model`` drops the file's keys that the model's
``state_dict()`` lacks (its ``filter_state_dict``) before it loads, so a stock
checkpoint's ``linear_q/k/v`` never reached a ``flash_mha`` layer with the fused
``linear_qkv``: q, k and v kept their random initialisation, and ESPnet's
"Filter out ..." warnings were the only sign (an independent probe: logits 0.35
off the source model's). ``--ignore_init_mismatch`` is how ESPnet recipes
fine-tune a pretrained model on a new vocabulary, so a stock checkpoint there is
the common case, not a corner.

:func:`install` wraps ``filter_state_dict`` so that the file's q/k/v keys in the
other layout are matched to the model before ESPnet's filter sees them:

- the model has ``P.linear_qkv`` (our fused layer) and the file ``P.linear_q/k/v``:
  the stock keys whose shapes fit are kept, and the layer's load hook takes them
  as it takes a plain stock state dict (the model's current rows stand in for
  parts the file lacks, as with ``--init_param``'s exclusions);
- the model has ``P.linear_q/k/v`` (the stock layer, or ours with the stock
  parameters) and the file ``P.linear_qkv``: the fused tensor is split into the
  stock keys, which every such layer loads.

The startup hook installs the wrapper when ESPnet imports the S4 layer registry (so
a stock model in a run that never builds our layer gets it too), and so does importing
:mod:`espnet_mha.layer` (for runs with the hook off).

A layer whose file keys are in both layouts, or whose shapes do not fit, is left
to ESPnet's filter as before. What was matched is logged at INFO level, beside
ESPnet's own log lines.
"""

import logging

import torch

from espnet_mha.checkpoint_keys import FUSED_KEY, STOCK_KEY
from espnet_mha.fused_keys import FUSED_PROJECTION, STOCK_PROJECTIONS
from espnet_mha.wrapping import replace_function

logger = logging.getLogger(__name__)


def _fits(part, whole):
    """Whether ``part`` is one of the three row blocks of ``whole`` by shape."""
    return (isinstance(part, torch.Tensor) and isinstance(whole, torch.Tensor) and part.dim() == whole.dim() >= 1
            and whole.size(0) == 3 * part.size(0) and part.shape[1:] == whole.shape[1:])


def match_layouts(dst_state, src_state):
    """The file's q/k/v keys in the model's layout, as described in the module docstring.

    Args:
        dst_state: the model's (or sub-module's) state dict, as ESPnet passes it.
        src_state: the file's state dict, after ESPnet's exclusions and key mapping.

    Returns:
        (state, kept): a new dict with ``src_state``'s entries in its order, fused
        entries split into stock ones where the model has the stock keys; and the
        set of stock keys kept for the model's fused layers, which ESPnet's filter
        must not see (they are not in ``dst_state``).
    """
    names = [key for key in src_state if isinstance(key, str)]  # ESPnet's filter drops other keys itself
    stock_in_file = {m.group(1) for m in map(STOCK_KEY.match, names) if m}
    fused_in_file = {m.group(1) for m in map(FUSED_KEY.match, names) if m}
    state, kept, split = {}, set(), []
    for key, value in src_state.items():
        stock, fused = (STOCK_KEY.match(key), FUSED_KEY.match(key)) if isinstance(key, str) else (None, None)
        if key in dst_state or not (stock or fused):
            state[key] = value
        elif stock and stock.group(1) not in fused_in_file and _fits(
                value, dst_state.get(f"{stock.group(1)}{FUSED_PROJECTION}.{stock.group(3)}")):
            state[key] = value
            kept.add(key)
        elif fused and fused.group(1) not in stock_in_file and all(
                _fits(dst_state.get(f"{fused.group(1)}{name}.{fused.group(2)}"), value) for name in STOCK_PROJECTIONS):
            for name, part in zip(STOCK_PROJECTIONS, value.detach().chunk(3, dim=0)):
                state[f"{fused.group(1)}{name}.{fused.group(2)}"] = part
            split.append(key)
        else:
            state[key] = value
    if kept:
        layers = sorted({STOCK_KEY.match(key).group(1).rstrip(".") for key in kept})
        logger.info("espnet_mha: --ignore_init_mismatch: kept %d stock q/k/v keys of %d layer(s) for their fused "
                    "linear_qkv (first: %s) instead of filtering them out", len(kept), len(layers),
                    repr(layers[0]) if layers[0] else "the module itself")
    if split:
        logger.info("espnet_mha: --ignore_init_mismatch: split %d fused linear_qkv keys into the model's stock "
                    "linear_q/k/v (first: %r) instead of filtering them out", len(split), split[0])
    return state, kept


# ESPnet's filter_state_dict once install() has replaced it (kept across importlib.reload,
# which leaves ESPnet calling the wrapper it had).
_ORIGINAL = globals().get("_ORIGINAL", {})


def filter_state_dict(dst_state, src_state):
    """ESPnet's ``filter_state_dict`` after :func:`match_layouts` (a module-level function, so
    it pickles by name like the one it replaces).

    Args:
        dst_state: the model's (or sub-module's) state dict.
        src_state: the file's state dict.

    Returns:
        dict: the file's entries to load, in its order: what ESPnet's filter keeps, plus the
        stock q/k/v keys kept for our fused layers.
    """
    state, kept = match_layouts(dst_state, src_state)
    filtered = _ORIGINAL["filter_state_dict"](dst_state, {key: value for key, value in state.items()
                                                          if key not in kept})
    result = {key: value if key in kept else filtered[key] for key, value in state.items()
              if key in kept or key in filtered}
    result.update((key, value) for key, value in filtered.items() if key not in result)  # what a wrapper added
    return result


def install():
    """Wrap ``espnet2.torch_utils.load_pretrained_model.filter_state_dict`` (idempotent;
    nothing is done where ESPnet has no such function; a function someone else put there
    since is left in place, see :mod:`espnet_mha.wrapping`).

    Returns:
        bool: whether ESPnet's function was found.
    """
    return replace_function("espnet2.torch_utils.load_pretrained_model", filter_state_dict, _ORIGINAL) is not None
