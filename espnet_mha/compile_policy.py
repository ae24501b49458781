"""When and how the layer's pure functions are compiled with ``torch.compile``.

Policy:

- ``compile=False`` (default ``"auto"`` on devices where eager measured faster,
  see ``AUTO_COMPILE_DEVICES``), ``True``, or ``"auto"``; the environment
  variable ``ESPNET_MHA_COMPILE`` (``0``/``1``/``auto``) overrides the option,
  ``ESPNET_MHA_COMPILE_MODE`` the mode (``default``, ``reduce-overhead``,
  ``max-autotune``...).
- Compilation is lazy: the first call on a device compiles.
- ``dynamic=True`` so a new batch size or length does not recompile; sizes 0/1
  are still specialised by dynamo (#136605), which bounds the graphs to a fixed
  set per configuration (1 vs many hypotheses, T1 = 1 vs many). A call beyond
  dynamo's recompile limit runs eagerly, with a warning (see :func:`compiled`).
- ``fullgraph=True``: a graph break is an error, not a silent slowdown.
- The functions are module-level and take the parameters as arguments, so all
  layers of a model with one parameter layout share graphs and state-dict keys never
  get ``_orig_mod.``.
"""

import functools
import logging
import os

import torch

from espnet_mha import checks

logger = logging.getLogger(__name__)

ENV_COMPILE = "ESPNET_MHA_COMPILE"
ENV_COMPILE_MODE = "ESPNET_MHA_COMPILE_MODE"
AUTO = "auto"
# Device types where "auto" compiles. CPU is absent: measured slower end to end
# for ESPnet training and decoding (see README, "torch.compile policy").
AUTO_COMPILE_DEVICES = frozenset()
# Our functions need a few graphs each (self/cross, mask kinds, size-1
# specialisations); make sure dynamo's default limit of 8 does not silently
# fall back to eager for a model that uses all of them.
MIN_RECOMPILE_LIMIT = 64


def resolve_compile(option, mode, *, environment=True):
    """The compile setting and mode a layer uses (environment wins over options).

    Args:
        option: None (= "auto"), True, False or "auto".
        mode: None or a ``torch.compile`` mode string.
        environment: read ``$ESPNET_MHA_COMPILE`` and ``$ESPNET_MHA_COMPILE_MODE`` (when a
            layer is built; not for options set on a built layer, which override them).

    Returns:
        (setting, mode) with setting in ``{True, False, "auto"}``.

    Raises:
        ValueError: an option or environment value is not recognised.
    """
    # The option is checked even where the environment overrides it. 0 and 1 (a YAML
    # config's integers) are False and True; other numbers are not (1.0 == True).
    given, option, mode = option, checks.option_word(option), checks.option_word(mode)
    if type(option) is int and option in (0, 1):
        option = bool(option)
    if not (option is None or type(option) is bool or (isinstance(option, str) and option == AUTO)):
        raise ValueError(f"compile must be True, False or 'auto', got {given!r}")
    env = os.environ.get(ENV_COMPILE, "") if environment else ""
    if env.strip():
        option = checks.env_flag(ENV_COMPILE, env, extra=(AUTO,))
    elif option is None:
        option = AUTO
    # As ESPNET_MHA_BACKEND; modes are lower case.
    env_mode = os.environ.get(ENV_COMPILE_MODE, "").strip().lower() if environment else ""
    mode = env_mode or mode
    if mode is not None and (not isinstance(mode, str) or mode not in _modes()):
        name = f"{ENV_COMPILE_MODE}" if env_mode else "compile_mode"
        raise ValueError(f"{name} must be None or one of {_modes()}, got {mode!r}")
    if mode is not None and (option is False or (option == AUTO and not AUTO_COMPILE_DEVICES)):
        # The mode applies only to compiled calls, and this setting makes none (an audit: it was
        # dropped without a word).
        logger.warning("espnet_mha: %s=%r has no effect with compile=%r, which compiles nothing; pass "
                       "compile=True (or %s=1) to compile", ENV_COMPILE_MODE if env_mode else "compile_mode",
                       mode, option, ENV_COMPILE)
    return option, mode


@functools.lru_cache(maxsize=None)
def _modes():
    """The ``torch.compile`` modes this torch knows (checked here, not at the first call)."""
    from torch._inductor import list_mode_options  # what torch.compile validates a mode against

    return tuple(list_mode_options())


def wants_compile(setting, device_type):
    """Whether to run compiled on ``device_type`` under ``setting``."""
    if setting == AUTO:
        return device_type in AUTO_COMPILE_DEVICES
    return bool(setting)


def log(name, level, message, *args):
    """``logging.getLogger(name).log(level, message, *args)``, also while Dynamo traces the
    call for a user's ``torch.compile``: a logging call cannot be traced there (``fullgraph``
    refused the call, a probe found), so the line is written once, when the call is traced,
    through ``comptime``, which adds nothing to the graph (and the compiled graph never
    decides again). ``args`` must then be constants: strings or numbers."""
    def write():
        logging.getLogger(name).log(level, message, *args)

    if not torch.compiler.is_compiling():
        write()
        return
    from torch._dynamo.comptime import comptime

    # comptime runs the fallback where is_compiling() is set without Dynamo (non-strict torch.export).
    comptime(_write_traced_line, write)


def _write_traced_line(ctx):
    """:func:`log`'s line, from the traced frame's constants."""
    name, level, message, args = (ctx.get_local(n).as_python_constant() for n in ("name", "level", "message", "args"))
    logging.getLogger(name).log(level, message, *args)


@functools.lru_cache(maxsize=None)
def compiled(fn, mode):
    """``torch.compile(fn)`` with our policy, made once per (function, mode).

    Each function's graphs count against dynamo's recompile limit (for all layers,
    dtypes and modes together). A call that would need a graph beyond it runs ``fn``
    eagerly, with a warning (the first time per function; then at debug level) and
    counted in :func:`eager_fallbacks`, as dynamo itself falls back to eager there
    without ``fullgraph``. ``torch._dynamo.config.fail_on_recompile_limit_hit = True``,
    dynamo's own switch against that fallback, makes it raise instead."""
    # recompile_limit is torch >= 2.7's name for cache_size_limit.
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    limit = getattr(torch._dynamo.config, name, None)
    if limit is not None and limit < MIN_RECOMPILE_LIMIT:
        logger.info("espnet_mha: raising torch._dynamo.config.%s from %s to %s (our functions need a "
                    "graph per call form)", name, limit, MIN_RECOMPILE_LIMIT)
        setattr(torch._dynamo.config, name, MIN_RECOMPILE_LIMIT)
    logger.info("espnet_mha: compiling %s (mode=%s, dynamic, fullgraph)", fn.__name__, mode)
    graph = torch.compile(fn, dynamic=True, fullgraph=True, mode=mode)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return graph(*args, **kwargs)
        except _LIMIT_HIT as error:  # raised before the graph runs: nothing was computed
            if getattr(torch._dynamo.config, "fail_on_recompile_limit_hit", False):
                raise
            _FALLBACKS[fn.__name__] = _FALLBACKS.get(fn.__name__, 0) + 1
            logger.log(logging.WARNING if _FALLBACKS[fn.__name__] == 1 else logging.DEBUG,
                       "espnet_mha: compile=True: %s reached dynamo's recompile limit (torch._dynamo.config.%s"
                       " = %s graphs for all layers, sizes 0 and 1, mask forms, grad modes); calls that need "
                       "a new graph run eagerly (same results). Raise the limit, or set "
                       "torch._dynamo.config.fail_on_recompile_limit_hit = True to make this an error. (%s)",
                       fn.__name__, name, getattr(torch._dynamo.config, name, "?"), str(error).splitlines()[0])
            return fn(*args, **kwargs)

    return run


# What dynamo raises when a fullgraph function needs a graph beyond the limit
# (CacheLimitExceeded in torch 2.5, FailOnCacheLimitHit up to 2.6).
_LIMIT_HIT = tuple(getattr(torch._dynamo.exc, name)
                   for name in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit", "CacheLimitExceeded")
                   if hasattr(torch._dynamo.exc, name))
# Per function name: calls run eagerly because the recompile limit was reached.
_FALLBACKS = {}


def eager_fallbacks():
    """{function name: calls that ran eagerly because dynamo's recompile limit was reached}."""
    return dict(_FALLBACKS)


def pick(fn, setting, mode, device_type):
    """``fn`` itself or its compiled version, according to the policy."""
    # A capture cannot trace into a dynamo-compiled function (jit.trace refuses it), nor can
    # a fullgraph compile run inside torch.func transforms ("Unsupported functorch tracing
    # attempt") or a forward-mode AD level (its graph has no jvp): those run the eager
    # function, as a user's torch.compile falls back to eager there (an audit).
    if (torch.compiler.is_compiling() or not wants_compile(setting, device_type) or capturing()
            or torch._C._are_functorch_transforms_active() or checks.forward_ad_active()):
        return fn
    return compiled(fn, mode)


def capturing():
    """Whether a graph is being captured with fixed Python control flow: ``torch.jit.trace``
    (and the TorchScript ONNX exporter built on it) or ``torch.export`` (and the dynamo
    ONNX exporter). Such graphs keep only the branches the example took, so the layer
    then takes the stock computation (no padded-key skipping, no decoding cache, no
    size-1 shortcuts): what it branches on is the form of the call (self- or
    cross-attention, which mask shape), never mask values, strides or batch sizes."""
    if torch.jit.is_tracing():
        return True
    exporting = _exporting()
    # torch < 2.7 cannot tell torch.export from torch.compile (both run dynamo, and
    # non-strict export sets is_compiling): both count as a capture there, so a user's
    # torch.compile gets the stock computation (correct; no cache, no skipping).
    return torch.compiler.is_compiling() if exporting is None else exporting


def plain_eager():
    """Whether a call runs eagerly on real tensors, so the mask's values can be read: not
    under ``torch.compile`` or a capture (:func:`capturing`), functorch transforms
    (``vmap``, ``grad``...) or a ``TorchDispatchMode`` (``make_fx``, ``FlopCounterMode``...)."""
    return not (torch.compiler.is_compiling() or capturing()
                or torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack())


def _exporting():
    """Whether ``torch.export`` is tracing, or None where torch cannot say (torch < 2.7)."""
    # Not torch.compiler.is_exporting() first: dynamo reads it as True under torch.compile
    # too (pytorch PR #164721), where the layer keeps its cache; the flag it returns
    # outside dynamo is set by torch.export only.
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is not None:
        return bool(flag)
    if hasattr(torch.compiler, "is_exporting"):
        return bool(torch.compiler.is_exporting())
    return None
