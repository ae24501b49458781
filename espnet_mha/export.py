"""An experiment folder for stock ESPnet: ``espnet-mha-convert EXP_DIR OUT_DIR --to stock``.

A model trained with ``flash_mha`` needs two changes before stock ESPnet (without
espnet-mha) can decode or fine-tune it: its ``config.yaml`` must build ``mha``
(stock ESPnet raises ``KeyError: 'flash_mha'``), and its model files must hold
``linear_q/k/v`` instead of the fused ``linear_qkv``. Only one of the two is
worse than neither: ESPnet's ``build_model_from_file`` loads with
``strict=False``, so an edited config with unconverted files decodes with
random q/k/v and no warning. This writes both, for every model file of the
folder, so the averaged model, ``valid.*.best.pth`` and each ``*epoch.pth``
(which ``--keep_nbest_models`` averaging reads again after a resumed run)
agree with the config.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from espnet_mha.checkpoint import fused_layers, strip_wrapper_prefixes
from espnet_mha.checkpoint_io import FLAT, ConversionError, load_weights_only, model_state, save_atomic

CONFIG = "config.yaml"
TRAINING_CHECKPOINT = "checkpoint.pth"
OUR_NAME, STOCK_NAME = "flash_mha", "mha"
# Options of our layer that the stock one does not have (it would ignore them).
OUR_OPTIONS = ("causal", "keep_attn", "backend", "compile", "compile_mode", "state_dict_layout")


@dataclass
class ExportReport:
    """What :func:`export_experiment` did."""

    src: Path
    dst: Path
    layers: list = field(default_factory=list)  # config paths of the layers made stock mha
    converted: list = field(default_factory=list)  # (file name, n layers converted)
    copied: list = field(default_factory=list)
    links: list = field(default_factory=list)  # (link name, target name)
    skipped: list = field(default_factory=list)  # (name, why)

    def lines(self):
        out = [f"read {self.src / CONFIG}: {len(self.layers)} attention layer(s) -> stock mha"
               + (f" ({', '.join(self.layers)})" if self.layers else "")]
        out += [f"converted {name}: {n} attention layer(s) to stock" for name, n in self.converted]
        out += [f"copied {name}: nothing to convert" for name in self.copied]
        out += [f"linked {name} -> {target}" for name, target in self.links]
        out += [f"skipped {name}: {why}" for name, why in self.skipped]
        out.append(f"wrote {self.dst / CONFIG} and {len(self.converted) + len(self.copied) + len(self.links)} "
                   f"model file(s) in {self.dst}")
        return out


def stock_config(config, path="config"):
    """A copy of a loaded ``config.yaml`` whose ``flash_mha`` layers (and ``mha`` layers with
    our options) are ``mha`` without our options, and the paths of those layers (e.g.
    ``decoder_conf.layer[1]``).

    Raises:
        ConversionError: a layer has ``causal: true``, which the stock layer cannot compute.
    """
    if isinstance(config, list):
        pairs = [stock_config(item, f"{path}[{i}]") for i, item in enumerate(config)]
        return [item for item, _ in pairs], [p for _, paths in pairs for p in paths]
    if not isinstance(config, dict):
        return config, []
    name = config.get("_name_")
    if name in (OUR_NAME, STOCK_NAME):
        # mha too: under ESPNET_MHA_REPLACE_MHA=1 it builds our layer, which reads our options.
        if config.get("causal"):
            raise ConversionError(f"{path}: {name} with causal: true has no stock equivalent (the stock mha "
                                  "attends to every position); not exported")
        if name == OUR_NAME or any(k in config for k in OUR_OPTIONS):
            return {k: v for k, v in config.items() if k not in OUR_OPTIONS} | {"_name_": STOCK_NAME}, [path]
    new, paths = {}, []
    for key, value in config.items():
        new[key], found = stock_config(value, f"{key}" if path == "config" else f"{path}.{key}")
        paths += found
    return new, paths


def export_experiment(src, dst, *, force=False, allow_globals=(), drop_optimizer_state=False):
    """Write ``dst``: ``src``'s ``config.yaml`` for stock ESPnet, and each of its ``*.pth``
    model files in the stock layout, with their file modes (links to model files of the
    folder, such as ``valid.acc.ave.pth``, stay links).

    ``checkpoint.pth`` (training state) is converted with its optimizer state (see
    :mod:`espnet_mha.optimizer_state`; without it if ``drop_optimizer_state``), so stock
    ESPnet can resume the run. It needs ``allow_globals`` (ESPnet's reporter holds
    ``datetime.timedelta``); when it cannot be read or converted it is skipped, as are
    links to what is not exported, dangling links and ``*.pth`` files that are no model,
    and the report says why. Other files (logs, images, decoding results) are not copied. All is
    written to a temporary folder in ``dst`` and moved into place at the end, so an
    error leaves ``dst`` as it was.

    Raises:
        ConversionError: no ``config.yaml``; a causal layer; a file that cannot be
            read (see :func:`espnet_mha.checkpoint_io.load_weights_only`).
        FileExistsError: a file to write exists and not ``force`` (checked before writing).
        ValueError: ``dst`` is ``src``.
    """
    import yaml
    from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump

    src, dst = Path(src), Path(dst)
    if not (src / CONFIG).is_file():
        raise ConversionError(f"{src}: no {CONFIG} (an ESPnet experiment folder has one next to its model files)")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"OUT_DIR must be another folder than EXP_DIR ({src})")
    with open(src / CONFIG, encoding="utf-8") as f:
        try:
            loaded = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ConversionError(f"{src / CONFIG}: not YAML ESPnet can read ({error})") from None
    config, layers = stock_config(loaded)
    report = ExportReport(src, dst, layers)
    files, links = _plan(src, report)
    if not force:
        taken = [dst / n for n in [CONFIG, *(p.name for p in files), *links]
                 if (dst / n).exists() or (dst / n).is_symlink()]
        if taken:
            raise FileExistsError(f"{', '.join(map(str, taken))} exist(s); pass --force (force=True) to overwrite")
    dst.mkdir(parents=True, exist_ok=True)
    # Everything is written into a temporary folder first and moved into place at the
    # end, so a failure (an unreadable file, a refused class) leaves OUT_DIR as it was.
    work = Path(tempfile.mkdtemp(dir=dst, prefix=".espnet-mha-export."))
    try:
        written = {p.name for p in files if _export_file(p, work / p.name, report, allow_globals,
                                                         drop_optimizer_state, loaded)}
        for name, target in links.items():
            if target in written:
                (work / name).symlink_to(target)
                report.links.append((name, target))
            else:
                report.skipped.append((name, f"a link to {target}, which is not exported"))
        with open(work / CONFIG, "w", encoding="utf-8") as f:
            yaml_no_alias_safe_dump(config, f, indent=4, sort_keys=False)
        shutil.copymode(src / CONFIG, work / CONFIG)
        for path in sorted(work.iterdir()):
            os.replace(path, dst / path.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _plan(src, report):
    """(model files to export, {link name: target name}) of ``src``'s ``*.pth`` entries;
    what is left out goes to ``report.skipped``. A link to a model file of the folder stays
    a link (by the target's name); a link elsewhere is exported as a file."""
    entries = sorted(src.glob("*.pth"))
    regular = {p.name for p in entries if p.is_file() and not p.is_symlink()}
    files, links = [], {}
    for path in entries:
        if path.is_symlink():
            target = path.resolve()
            if not target.is_file():
                report.skipped.append((path.name, f"a link to {os.readlink(path)}, which does not exist"))
                continue
            if target.parent == src.resolve() and target.name in regular:
                links[path.name] = target.name
                continue
        elif not path.is_file():
            continue
        files.append(path)
    return files, links


def _export_file(path, out, report, allow_globals, drop_optimizer_state, config):
    """Write ``path`` in the stock layout to ``out`` (with ``path``'s file mode); whether it did."""
    from espnet_mha.convert import convert_object

    training = path.name == TRAINING_CHECKPOINT
    try:
        # A model file that cannot be read (damaged, or classes to admit) stops the export;
        # the training state is optional: it is skipped, with the reason.
        obj = load_weights_only(path, allow_globals=allow_globals)
    except ConversionError as error:
        if not training:
            raise
        report.skipped.append((path.name, f"training state not exported: {error}"))
        return False
    try:
        kind, state = model_state(obj, path=path)
    except ConversionError:
        report.skipped.append((path.name, "not an ESPnet model file"))
        return False
    state, stripped = strip_wrapper_prefixes(state)
    if not (fused_layers(state) or stripped):
        shutil.copyfile(path, out)
        report.copied.append(path.name)
    else:
        try:
            converted, done = convert_object(obj, src=path, dst=out, to="stock",
                                             drop_optimizer_state=drop_optimizer_state, config=config)
        except ConversionError as error:
            if kind == FLAT:
                raise
            report.skipped.append((path.name, f"training state not exported: {error}"))
            return False
        save_atomic(converted, out, force=True)
        report.converted.append((path.name, len(done.layers)))
    shutil.copymode(path, out)
    return True
