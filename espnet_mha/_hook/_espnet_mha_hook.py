"""Startup hook installed next to ``espnet_mha`` (as ``_espnet_mha_hook.py`` plus a ``.pth``).

It makes ``flash_mha`` visible to ESPnet's own entry points
(``python -m espnet2.bin.asr_train``) without importing anything heavy at
interpreter start: it only puts a finder on ``sys.meta_path`` that waits for
``espnet2.asr.state_spaces.registry`` to be imported, then adds our entry to
its ``layer`` dict (and, if ``ESPNET_MHA_REPLACE_MHA=1``, points ``mha`` at our
layer too), and wraps ESPnet's ``--init_param`` filter (``espnet_mha.init_param``),
so that a stock S4 model fine-tuned from a ``flash_mha`` checkpoint with
``--ignore_init_mismatch true`` gets its fused q/k/v in a run that never builds our
layer (ESPnet's filter dropped them). Only processes that import the S4 registry
(ESPnet's ASR-like tasks) are touched; torch is loaded by then. Set
``ESPNET_MHA_NO_HOOK=1`` to disable it (0/false/no/off, in any case, leave it on).
"""

import os
import sys

_TARGET = "espnet2.asr.state_spaces.registry"


class _RegistryFinder:
    """Meta-path finder that patches the ESPnet layer registry right after it loads."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _TARGET:
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

        def exec_and_register(module):
            exec_module(module)
            _remove()
            _registry_loaded()

        spec.loader.exec_module = exec_and_register
        return spec


def _registry_loaded():
    from espnet_mha.registration import apply_environment

    apply_environment()
    from espnet_mha.init_param import install  # imports ESPnet's loader (torch only)

    install()


def _remove():
    try:
        sys.meta_path.remove(_RegistryFinder)
    except ValueError:  # removed already (another thread's import)
        pass


def _install():
    # Off spellings as the package's other on/off variables take them (checks.ENV_FALSE, not
    # imported: it would import torch at every interpreter start; "off" disabled the hook);
    # any other value disables it (nothing can be raised at interpreter start).
    if os.environ.get("ESPNET_MHA_NO_HOOK", "").strip().lower() not in ("", "0", "false", "no", "off"):
        return
    if _TARGET in sys.modules:
        _registry_loaded()
        return
    if _RegistryFinder not in sys.meta_path:
        sys.meta_path.insert(0, _RegistryFinder)


_install()
