"""The attention layers of an ESPnet ``config.yaml`` (or of the saved training
arguments of a Lightning checkpoint) renamed between ``mha`` and ``flash_mha``:
what :mod:`espnet_mha.export` writes beside the converted model files, so the
config builds the layer whose parameter layout the files hold; and, for a single
converted file, the ``config.yaml`` beside it and the warning when it names the stock
layer (:mod:`espnet_mha.convert`).
"""

import argparse
from pathlib import Path

from espnet_mha.checkpoint_io import ConversionError

OUR_NAME, STOCK_NAME = "flash_mha", "mha"
# Options of our layer that the stock one does not have (it would ignore them).
OUR_OPTIONS = ("causal", "keep_attn", "backend", "compile", "compile_mode", "state_dict_layout")


def rename_layers(config, rename, path="config"):
    """Walk a loaded config (dicts and lists) and replace the dicts ``rename`` maps.

    Args:
        config: the loaded YAML, or any part of it.
        rename: ``rename(item, path)`` for each dict met: a dict to put in its place
            (not walked further), or None to keep it and walk its values.
        path: where ``config`` sits, as the paths returned spell it.

    Returns:
        (a copy of ``config`` with the replacements, the paths of the replaced dicts,
        e.g. ``decoder_conf.layer[1]``).
    """
    if isinstance(config, list):
        pairs = [rename_layers(item, rename, f"{path}[{i}]") for i, item in enumerate(config)]
        return [item for item, _ in pairs], [p for _, paths in pairs for p in paths]
    if not isinstance(config, dict):
        return config, []
    renamed = rename(config, path)
    if renamed is not None:
        return renamed, [path]
    new, paths = {}, []
    for key, value in config.items():
        new[key], found = rename_layers(value, rename, key if path == "config" else f"{path}.{key}")
        paths += found
    return new, paths


def stock_config(config):
    """A copy of a loaded ``config.yaml`` whose ``flash_mha`` layers (and ``mha`` layers with
    our options) are ``mha`` without our options, and the paths of those layers.

    Raises:
        ConversionError: a ``flash_mha`` layer has ``causal: true``, which the stock layer
            cannot compute (an ``mha`` layer's is dropped: the ``mha`` name ignores it).
    """
    def rename(item, path):
        name = item.get("_name_")
        if name not in (OUR_NAME, STOCK_NAME):
            return None
        # mha too: under ESPNET_MHA_REPLACE_MHA=1 it builds our layer, which reads our options
        # but causal, which it ignores, as the stock layer does.
        if name == OUR_NAME and item.get("causal"):
            raise ConversionError(f"{path}: {name} with causal: true has no stock equivalent (the stock mha "
                                  "attends to every position); not exported")
        if name == OUR_NAME or any(k in item for k in OUR_OPTIONS):
            return {k: v for k, v in item.items() if k not in OUR_OPTIONS} | {"_name_": STOCK_NAME}
        return None

    return rename_layers(config, rename)


def fused_config(config):
    """A copy of a loaded ``config.yaml`` whose ``mha`` layers are ``flash_mha`` (other options
    kept, but ``causal``, which the stock layer ignores) and whose attention layers have the
    fused parameters (no ``state_dict_layout: stock``, whose layers would split the fused
    files again and whose parameter list would not fit the converted optimizer state), and
    the paths of those layers."""
    def rename(item, path):
        name = item.get("_name_")
        if name not in (OUR_NAME, STOCK_NAME) or (name == OUR_NAME and "state_dict_layout" not in item):
            return None
        # An mha layer's causal option was ignored (the stock layer drops unknown options):
        # kept, it would turn the converted layer into causal self-attention.
        dropped = ("state_dict_layout", "causal") if name == STOCK_NAME else ("state_dict_layout",)
        return {k: v for k, v in item.items() if k not in dropped} | {"_name_": OUR_NAME}

    return rename_layers(config, rename)


def lightning_arguments(obj, to):
    """``obj`` (a Lightning checkpoint) with the training arguments ESPnet's ``LitESPnetModel``
    saves as its hyper-parameters (``hyper_parameters["args"]``, the config as a Namespace,
    or a dict) in the layout ``to``, as ``config.yaml`` (what
    ``LitESPnetModel.load_from_checkpoint`` builds); ``obj`` itself when they need no change."""
    hyper = obj.get("hyper_parameters")
    args = hyper.get("args") if isinstance(hyper, dict) else None
    if not isinstance(args, (argparse.Namespace, dict)):
        return obj
    config, renamed = (stock_config if to == "stock" else fused_config)(dict(vars(args)) if isinstance(
        args, argparse.Namespace) else args)
    if not renamed:
        return obj
    args = argparse.Namespace(**config) if isinstance(args, argparse.Namespace) else config
    return obj | {"hyper_parameters": hyper | {"args": args}}


def config_beside(path):
    """The ``config.yaml`` ESPnet writes beside its model files, as a dict, or None (absent, unreadable)."""
    import yaml

    config = Path(path).parent / "config.yaml"
    try:
        with open(config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def stock_config_warning(src, dst, config):
    """A warning when the ``config.yaml`` that goes with a file converted to fused names the
    stock ``mha``: ESPnet builds the stock layer from it and loads with ``strict=False``, which
    drops ``linear_qkv`` (random q/k/v, without a word). An audit converted a single file in
    place and decoded with its old config."""
    beside_dst = config_beside(dst)
    config, where = (beside_dst, Path(dst).parent) if beside_dst is not None else (config, Path(src).parent)
    if not isinstance(config, dict):
        return []
    _, stock_named = rename_layers(config, lambda item, path: item if item.get("_name_") == STOCK_NAME else None)
    if not stock_named:
        return []
    return [f"{where / 'config.yaml'} names the stock mha at {', '.join(stock_named)}: a model built from it has "
            "the stock layer, and ESPnet's loader (strict=False) drops these fused keys. Convert the whole "
            "experiment folder instead (espnet-mha-convert EXP_DIR OUT_DIR --to fused), which rewrites the "
            "config, or change those layers to _name_: flash_mha"]
