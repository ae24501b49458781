"""Startup hook installed next to ``espnet_mha`` (as ``_espnet_mha_hook.py`` plus a ``.pth``).

It makes ``flash_mha`` visible to ESPnet's own entry points
(``python -m espnet2.bin.asr_train``) without importing anything heavy at
interpreter start: it only puts a finder on ``sys.meta_path`` that waits for two
ESPnet modules to be imported:

- ``espnet2.asr.state_spaces.registry``: adds our entry to its ``layer`` dict (and, if
  ``ESPNET_MHA_REPLACE_MHA=1``, points ``mha`` at our layer too);
- ``espnet2.torch_utils.load_pretrained_model``: wraps its ``filter_state_dict`` (see
  ``espnet_mha.init_param``), so that ``--init_param`` with ``--ignore_init_mismatch``
  splits a ``flash_mha`` checkpoint's fused ``linear_qkv`` for a stock model too, in a
  process that never builds our layer (ESPnet's filter dropped those keys: q, k and v
  kept their random initialisation).

Set ``ESPNET_MHA_NO_HOOK=1`` to disable it (0/false/no/off, in any case, leave it on).
"""

import os
import sys


def _registry_loaded():
    from espnet_mha.registration import apply_environment

    apply_environment()


def _loader_loaded():
    from espnet_mha.init_param import install

    install()


# The modules waited for, and what runs right after each has been executed.
_TARGETS = {
    "espnet2.asr.state_spaces.registry": _registry_loaded,
    "espnet2.torch_utils.load_pretrained_model": _loader_loaded,
}
_pending = {}


class _ESPnetFinder:
    """Meta-path finder that runs a target's callback right after the target module loads."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        callback = _pending.get(name)
        if callback is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _done(name)
            callback()

        spec.loader.exec_module = exec_and_patch
        return spec


def _done(name):
    _pending.pop(name, None)
    if not _pending and _ESPnetFinder in sys.meta_path:
        sys.meta_path.remove(_ESPnetFinder)


def _install():
    # Off spellings as the package's other on/off variables take them (checks.ENV_FALSE, not
    # imported: it would import torch at every interpreter start; "off" disabled the hook);
    # any other value disables it (nothing can be raised at interpreter start).
    if os.environ.get("ESPNET_MHA_NO_HOOK", "").strip().lower() not in ("", "0", "false", "no", "off"):
        return
    loaded = [callback for name, callback in _TARGETS.items() if name in sys.modules]
    _pending.update((name, callback) for name, callback in _TARGETS.items() if name not in sys.modules)
    if _pending and _ESPnetFinder not in sys.meta_path:
        sys.meta_path.insert(0, _ESPnetFinder)
    for callback in loaded:
        callback()


_install()
