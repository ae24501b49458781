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
# What ``mha`` builds when it is ours: our layer with the stock parameters (and so stock
# checkpoints), because the config names the stock layer and may be loaded without espnet-mha.
MHA_LAYER_PATH = "espnet_mha.layer.StockLayoutFlashMultiHeadedAttention"
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
    """Make the plain ``mha`` name build our layer too (idempotent), here and in
    child interpreters (it sets ``ESPNET_MHA_REPLACE_MHA=1``, which spawned
    workers read at startup).

    For configs you cannot edit. ``restore_mha()`` undoes it. Layers that are
    already built are not affected. The layers it builds have the stock
    parameters, ``linear_q/k/v`` (the config says ``mha``, so its checkpoints
    must load into the stock layer too, and its options may name them).
    """
    register()[STOCK_MHA] = MHA_LAYER_PATH
    # Child interpreters (ESPnet's spawned DDP workers, subprocess decoders) build
    # their registry from the environment, through the startup hook.
    os.environ[ENV_REPLACE_MHA] = "1"
    logger.info("espnet_mha: registry name %r now builds %s", STOCK_MHA, MHA_LAYER_PATH)


def restore_mha():
    """Point ``mha`` back at ESPnet's stock layer (idempotent), here and in child
    interpreters started from now on."""
    register()[STOCK_MHA] = STOCK_LAYER_PATH
    os.environ[ENV_REPLACE_MHA] = "0"


def mha_is_ours():
    """Whether the plain ``mha`` name currently builds our layer."""
    return register().get(STOCK_MHA) in (MHA_LAYER_PATH, LAYER_PATH)


def apply_environment():
    """Register ``flash_mha`` and apply ``ESPNET_MHA_REPLACE_MHA`` (by the startup hook and
    ``import espnet_mha``).

    Raises:
        ValueError: if ``ESPNET_MHA_REPLACE_MHA`` is set to something other than 0/1
            (or false/true, no/yes, off/on).
    """
    register()
    from espnet_mha import checks  # lazy: this module imports nothing heavy

    value = os.environ.get(ENV_REPLACE_MHA, "")
    if value.strip() and checks.env_flag(ENV_REPLACE_MHA, value):
        use_for_mha()
