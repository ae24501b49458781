"""Registration of ``flash_mha`` in ESPnet's state-space layer registry.

ESPnet builds the layers of ``S4Decoder``/``SequenceModel`` with
``utils.instantiate(registry.layer, cfg, d_model)``, which looks ``cfg["_name_"]``
up in ``espnet2.asr.state_spaces.registry.layer`` and imports the dotted path it
finds there. Registering is therefore one dict item; this module never imports
torch so that the startup hook stays cheap.
"""

import logging
import os

logger = logging.getLogger(__name__)

FLASH_MHA = "flash_mha"
STOCK_MHA = "mha"
LAYER_PATH = "espnet_mha.layer.FlashMultiHeadedAttention"
STOCK_LAYER_PATH = "espnet2.asr.state_spaces.attention.MultiHeadedAttention"
ENV_REPLACE_MHA = "ESPNET_MHA_REPLACE_MHA"


def _registry():
    from espnet2.asr.state_spaces import registry

    return registry.layer


def register():
    """Add ``flash_mha`` to ESPnet's layer registry (idempotent).

    Returns:
        dict: the registry (``espnet2.asr.state_spaces.registry.layer``).
    """
    layers = _registry()
    layers[FLASH_MHA] = LAYER_PATH
    return layers


def use_for_mha():
    """Make the plain ``mha`` name build our layer too (idempotent).

    For configs you cannot edit. ``restore_mha()`` undoes it. Layers that are
    already built are not affected.
    """
    register()[STOCK_MHA] = LAYER_PATH
    logger.info("espnet_mha: registry name %r now builds %s", STOCK_MHA, LAYER_PATH)


def restore_mha():
    """Point ``mha`` back at ESPnet's stock layer (idempotent)."""
    register()[STOCK_MHA] = STOCK_LAYER_PATH


def mha_is_ours():
    """Whether the plain ``mha`` name currently builds our layer."""
    return register().get(STOCK_MHA) == LAYER_PATH


def apply_environment():
    """Register ``flash_mha`` and apply ``ESPNET_MHA_REPLACE_MHA`` (used by the startup hook).

    Raises:
        ValueError: if ``ESPNET_MHA_REPLACE_MHA`` is set to something other than 0/1.
    """
    register()
    value = os.environ.get(ENV_REPLACE_MHA, "").strip()
    if value in ("", "0"):
        return
    if value != "1":
        raise ValueError(f"{ENV_REPLACE_MHA} must be '0' or '1', got {value!r}")
    use_for_mha()
