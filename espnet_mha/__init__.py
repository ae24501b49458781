"""espnet-mha: a fast drop-in for ESPnet's state-space ``MultiHeadedAttention``.

Importing this package registers ``flash_mha`` in
``espnet2.asr.state_spaces.registry.layer`` (and applies
``ESPNET_MHA_REPLACE_MHA``, as the startup hook does). ``use_for_mha()`` makes the plain
``mha`` name build our layer too; ``restore_mha()`` undoes it. The import is
light (no torch) so that the startup hook costs nothing; the layer and helpers
load on first use.
"""

import importlib

from espnet_mha.registration import FLASH_MHA, apply_environment, mha_is_ours, register, restore_mha, use_for_mha

__version__ = "0.1.0"

_LAZY = {
    "FlashMultiHeadedAttention": "espnet_mha.layer",
    "BACKENDS": "espnet_mha.dispatch",
    "BackendUnavailableError": "espnet_mha.dispatch",
    "fuse_keys": "espnet_mha.fused_keys",
    "unfuse_keys": "espnet_mha.fused_keys",
    "load_stock_or_fused": "espnet_mha.checkpoint",
    "strip_wrapper_prefixes": "espnet_mha.checkpoint_keys",
    "to_fused": "espnet_mha.checkpoint",
    "to_stock": "espnet_mha.checkpoint",
    "merge_beam_states": "espnet_mha.beam_states",
    "restore_beam_states": "espnet_mha.beam_states",
}

__all__ = ["FLASH_MHA", "mha_is_ours", "register", "restore_mha", "use_for_mha", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'espnet_mha' has no attribute {name!r}")


apply_environment()
