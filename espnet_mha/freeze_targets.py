"""ESPnet's ``--freeze_param`` entries that name the stock ``linear_q/k/v``.

ESPnet's trainer freezes every parameter whose name equals an entry of
``--freeze_param`` or starts with it followed by a dot, and says nothing about an
entry that matches no parameter. An entry such as
``decoder.decoder.layers.1.layer.linear_q`` freezes the stock layer's query
projection; a ``flash_mha`` layer with the fused ``linear_qkv`` has no parameter
of that name, so nothing of it was frozen, without a word. (An entry that names
the layer or a module above it freezes ``linear_qkv`` with the rest, as for the
stock layer.)

The freezing is inline code in ``AbsTask.main_worker``, with nothing to wrap; the
next call there is ``cls.build_optimizers(args, model=model)``. :func:`install`
wraps ``AbsTask.build_optimizers`` so that it first logs a warning naming the
fused layers that the entries would have frozen in part or whole as stock layers,
and what to do instead; then ESPnet's method runs as it is. q, k and v rows of one
fused parameter cannot be frozen apart; freezing all three is freezing
``linear_qkv``.
"""

import logging
import sys

from espnet_mha.checkpoint_keys import fused_modules
from espnet_mha.fused_keys import FUSED_PROJECTION, STOCK_PROJECTIONS
from espnet_mha.wrapping import replace_classmethod

logger = logging.getLogger(__name__)

_TASK_MODULE = "espnet2.tasks.abs_task"

# ESPnet's build_optimizers (the function of its classmethod) once install() has replaced it
# (kept across importlib.reload, which leaves ESPnet calling the wrapper it had).
_ORIGINAL = globals().get("_ORIGINAL", {})


def missed_layers(model, freeze_param):
    """Names of our fused layers in ``model`` some of whose stock ``linear_q/k/v``
    parameters ``freeze_param`` would freeze by ESPnet's rule (the parameter's name
    equals an entry or starts with the entry and a dot) while it leaves the fused
    counterpart (``linear_qkv.weight`` for a ``weight``, ``.bias`` for a ``bias``)
    trainable.

    Args:
        model: an ``nn.Module``.
        freeze_param: the entries of ``--freeze_param``.

    Returns:
        list of module names, in ``named_modules()`` order.
    """
    entries = [entry for entry in freeze_param if isinstance(entry, str)]

    def frozen(name):
        return any(name == entry or name.startswith(entry + ".") for entry in entries)

    missed = []
    for name, _ in fused_modules(model):
        prefix = f"{name}." if name else ""
        if any(frozen(f"{prefix}{child}.{part}") and not frozen(f"{prefix}{FUSED_PROJECTION}.{part}")
               for child in STOCK_PROJECTIONS for part in ("weight", "bias")):
            missed.append(name)
    return missed


def build_optimizers(cls, args, model):
    """ESPnet's ``AbsTask.build_optimizers`` (same arguments, same result), after a
    warning when ``args.freeze_param`` names the stock q/k/v parameters of layers that
    have the fused ``linear_qkv`` (see the module docstring).

    Raises:
        whatever ESPnet's method raises.
    """
    entries = getattr(args, "freeze_param", None)
    if isinstance(entries, (list, tuple)) and entries and hasattr(model, "named_modules"):
        missed = missed_layers(model, entries)
        if missed:
            logger.warning(
                "espnet_mha: --freeze_param %s names the stock layer's linear_q/k/v, which %d flash_mha layer(s) "
                "with the fused linear_qkv do not have: their q, k and v stay trainable (first: %r). Freeze "
                "'%s.%s' (q, k and v together), or build those layers with state_dict_layout: stock (the "
                "stock linear_q/k/v, frozen one by one as in the stock layer)",
                list(entries), len(missed), missed[0], missed[0], FUSED_PROJECTION)
    return _ORIGINAL["build_optimizers"](cls, args, model=model)


def install():
    """Wrap ``espnet2.tasks.abs_task.AbsTask.build_optimizers`` (idempotent; nothing is done
    before ESPnet has imported that module, or where it has no such classmethod; a method
    someone else put there since is left in place, see :mod:`espnet_mha.wrapping`). ESPnet's
    tasks import it before they build a model, and the layer calls this when it is built.

    Returns:
        bool: whether ESPnet's method was found.
    """
    task = getattr(sys.modules.get(_TASK_MODULE), "AbsTask", None)
    return task is not None and replace_classmethod(task, build_optimizers, _ORIGINAL) is not None
