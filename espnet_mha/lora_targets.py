"""ESPnet's LoRA ``target_modules`` that name the stock ``linear_q/k/v``.

ESPnet's ``create_lora_adapter`` (``--use_adapter true --adapter lora``) swaps in a
LoRA linear for every module whose name ends with one of ``target_modules``, and
raises only when no module at all matches. ``[linear_q, linear_v]`` is the usual
choice; it adapts the stock layer's q and v projections, but a ``flash_mha``
layer with the fused ``linear_qkv`` has no module of those names, so it got no
adapter while a transformer encoder's own ``linear_q`` kept ESPnet from raising:
the decoder's attention stayed frozen without a word.

:func:`install` wraps ESPnet's function (in its module and in ``create_adapter``'s
table) so that it first logs a warning naming the fused layers that would have
been adapted as stock layers and are not, and what to do instead; then ESPnet's
function runs as it is. A target that names ``linear_qkv`` adapts the fused layer and
is not warned about; one that matches it only by a short ending (``v``, which selects the
stock layer's ``linear_v`` alone) is warned about too (:func:`widened_layers`). Layers
built with ``state_dict_layout: stock`` have the stock modules and are adapted as stock ones.
"""

import inspect
import logging
import sys

from espnet_mha.checkpoint_keys import fused_modules
from espnet_mha.fused_keys import FUSED_PROJECTION, STOCK_PROJECTIONS
from espnet_mha.wrapping import is_ours, replace_function

logger = logging.getLogger(__name__)

_ADAPTER_MODULE = "espnet2.layers.create_adapter_fn"

# ESPnet's create_lora_adapter once install() has replaced it (kept across importlib.reload,
# which leaves ESPnet calling the wrapper it had).
_ORIGINAL = globals().get("_ORIGINAL", {})


def _selected(model, target_modules):
    """Per fused layer of ``model``: ``(its name, the targets its linear_qkv ends with, whether
    any target selects one of the stock linear_q/k/v it would have)``, by ESPnet's rule (the
    module name ends with a target)."""
    targets = [t for t in target_modules if isinstance(t, str)]

    def full(prefix, child):
        return f"{prefix}.{child}" if prefix else child

    for name, _ in fused_modules(model):
        fused = full(name, FUSED_PROJECTION)
        stock = any(full(name, child).endswith(t) for child in STOCK_PROJECTIONS for t in targets)
        yield name, [t for t in targets if fused.endswith(t)], stock


def missed_layers(model, target_modules):
    """Names of our fused layers in ``model`` whose stock ``linear_q/k/v`` would match
    ``target_modules`` by ESPnet's rule (the module name ends with a target) and whose
    ``linear_qkv`` matches none.

    Args:
        model: an ``nn.Module``.
        target_modules: the names or name suffixes given to ``create_lora_adapter``.

    Returns:
        list of module names, in ``named_modules()`` order.
    """
    return [name for name, fused, stock in _selected(model, target_modules) if stock and not fused]


def widened_layers(model, target_modules):
    """Names of our fused layers in ``model`` whose ``linear_qkv`` matches ``target_modules``
    only by a shorter ending (``v``) that also selects some of the stock
    ``linear_q/k/v``: the stock layer adapts those projections, each with its own pair,
    where ESPnet gives the fused one a single pair for q, k and v together. A target that
    names ``linear_qkv`` itself is meant; it is not listed.

    Args, Returns: as :func:`missed_layers`.
    """
    return [name for name, fused, stock in _selected(model, target_modules)
            if stock and fused and not any(t.endswith(FUSED_PROJECTION) for t in fused)]


def create_lora_adapter(model, *args, **kwargs):
    """ESPnet's ``create_lora_adapter`` (same arguments, same result), after a warning
    when ``target_modules`` selects the stock q/k/v projections of layers that have
    the fused ``linear_qkv`` (see the module docstring).

    Raises:
        whatever ESPnet's function raises.
    """
    original = _ORIGINAL["create_lora_adapter"]
    try:
        bound = inspect.signature(original).bind(model, *args, **kwargs)
    except TypeError:
        return original(model, *args, **kwargs)  # ESPnet names the wrong argument
    bound.apply_defaults()
    targets = bound.arguments.get("target_modules")
    checkable = isinstance(targets, (list, tuple)) and hasattr(model, "named_modules")  # else ESPnet's error
    missed = missed_layers(model, targets) if checkable else []
    if missed:
        logger.warning(
            "espnet_mha: LoRA target_modules %s select the stock layer's linear_q/k/v, which %d flash_mha "
            "layer(s) with the fused linear_qkv do not have: they get no adapter (first: %r). Add 'linear_qkv' "
            "to target_modules (one low-rank pair for q, k and v together), or build those layers with "
            "state_dict_layout: stock (the stock linear_q/k/v, adapted one by one as in the stock layer)",
            list(targets), len(missed), missed[0])
    widened = widened_layers(model, targets) if checkable else []
    if widened:
        logger.warning(
            "espnet_mha: LoRA target_modules %s match the fused linear_qkv of %d flash_mha layer(s) by its "
            "ending (first: %r): ESPnet gives it one low-rank pair for q, k and v together, where the stock "
            "layer adapts only its matching linear_q/k/v, one by one. Build those layers with "
            "state_dict_layout: stock to adapt as the stock layer does, or name 'linear_qkv' to mean the fused one",
            list(targets), len(widened), widened[0])
    return original(*bound.args, **bound.kwargs)


def install():
    """Wrap ``espnet2.layers.create_adapter_fn.create_lora_adapter`` and the ``"lora"``
    entry of ``espnet2.layers.create_adapter.create_adapter_fn_table`` (idempotent;
    nothing is done where ESPnet has no such function) once ESPnet has imported them:
    importing them here would import ESPnet's s3prl front-end and try transformers,
    which can be slow or fail. ESPnet's tasks import them before they build a model,
    and the layer calls this when it is built.

    A function someone else put there since is left in place (see :mod:`espnet_mha.wrapping`).

    Returns:
        bool: whether ESPnet's function was found.
    """
    if _ADAPTER_MODULE not in sys.modules:
        return False
    original = replace_function(_ADAPTER_MODULE, create_lora_adapter, _ORIGINAL)
    if original is None:
        return False
    table = getattr(sys.modules.get("espnet2.layers.create_adapter"), "create_adapter_fn_table", None)
    if isinstance(table, dict) and (table.get("lora") is original or is_ours(table.get("lora"))):
        table["lora"] = create_lora_adapter
    return True
