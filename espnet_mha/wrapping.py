"""Putting our wrappers in place of ESPnet functions, once, next to anyone else's.

:mod:`espnet_mha.init_param`, :mod:`espnet_mha.lora_targets` and
:mod:`espnet_mha.freeze_targets` wrap an ESPnet function (or classmethod) that
selects our layers' parameters by name. Installs are repeated (at the startup hook,
at our layer's import, at each layer's construction), so each must be idempotent
and leave in place a function that someone else put there after ours: replacing it
would drop their wrapper, or, taking it for ESPnet's, make ours call theirs and
theirs ours, without end (a review). So ESPnet's function is recorded on its own
module (or class) the first time, and from then on only ESPnet's function or one of
ours (possibly from before an ``importlib.reload``) is replaced.
"""

import importlib

# What marks our wrappers, and the name ESPnet's function is kept under on its module or class.
WRAPPER = "_espnet_mha_wrapper"
ORIGINAL = "_espnet_mha_original_"


def is_ours(fn):
    """Whether ``fn`` is one of our wrappers: marked, and not someone else's
    ``functools.wraps`` copy of one (which copies the mark and adds ``__wrapped__``)."""
    return bool(getattr(fn, WRAPPER, False)) and "__wrapped__" not in getattr(fn, "__dict__", {})


def _replace(owner, name, wrapper, current, wrap):
    """ESPnet's ``name`` on ``owner`` (recorded there the first time), after putting
    ``wrap(wrapper)`` in place of ``current`` where that is ESPnet's or ours; None
    where nothing of ESPnet's is known."""
    original = vars(owner).get(ORIGINAL + name)
    if original is None:
        if current is None or is_ours(_function(current)):
            return None
        original = current
        setattr(owner, ORIGINAL + name, original)
    setattr(wrapper, WRAPPER, True)
    if current is original or is_ours(_function(current)):
        setattr(owner, name, wrap(wrapper))
    return original


def _function(value):
    return value.__func__ if isinstance(value, classmethod) else value


def replace_function(module_name, wrapper, originals):
    """Put ``wrapper`` in place of ESPnet's function of the same name in the module
    ``module_name`` (unless someone else's function is there now, which is left as it
    is) and keep ESPnet's in ``originals`` under that name.

    Returns:
        ESPnet's function, or None where there is no such module or function.
    """
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    name = wrapper.__name__
    original = _replace(module, name, wrapper, getattr(module, name, None), lambda fn: fn)
    if original is not None:
        originals[name] = original
    return original


def replace_classmethod(cls, wrapper, originals):
    """:func:`replace_function` for a classmethod of ``cls`` (its own, not inherited):
    ``wrapper(cls, ...)`` becomes the classmethod, and ``originals`` gets ESPnet's
    function (call it as ``originals[name](cls, ...)``).

    Returns:
        ESPnet's function, or None where ``cls`` has no such classmethod.
    """
    name = wrapper.__name__
    current = vars(cls).get(name)
    if not isinstance(current, classmethod):
        current = None
    original = _replace(cls, name, wrapper, current, classmethod)
    if original is None:
        return None
    originals[name] = original.__func__
    return original.__func__
