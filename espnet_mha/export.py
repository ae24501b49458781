"""Experiment folders between the layouts: ``espnet-mha-convert EXP_DIR OUT_DIR --to stock|fused``.

To stock: a model trained with ``flash_mha`` needs two changes before stock
ESPnet (without espnet-mha) can decode or fine-tune it: its ``config.yaml`` must
build ``mha`` (stock ESPnet raises ``KeyError: 'flash_mha'``), and its model
files must hold ``linear_q/k/v`` instead of the fused ``linear_qkv``. Only one
of the two is worse than neither: ESPnet's ``build_model_from_file`` loads with
``strict=False``, so an edited config with unconverted files decodes with random
q/k/v and no warning. This writes both, for every model file of the folder, so
the averaged model, ``valid.*.best.pth`` and each ``*epoch.pth`` (which
``--keep_nbest_models`` averaging reads again after a resumed run) agree with
the config.

To fused, usually in place (OUT_DIR = EXP_DIR): a stock run to be resumed with
``flash_mha``. ESPnet's resume needs ``checkpoint.pth`` with its optimizer state
in the fused order, and its end-of-training averaging adds the older
``*epoch.pth`` files key by key to the new ones, which fails on mixed layouts.
"""

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from espnet_mha.checkpoint_io import (FLAT, LIGHTNING, ConversionError, load_weights_only, model_state, naming_file,
                                      save_atomic)
from espnet_mha.checkpoint_keys import fused_layers, stock_layers, strip_wrapper_prefixes
from espnet_mha.configs import OUR_NAME, STOCK_NAME, fused_config, lightning_arguments, rename_layers, stock_config

CONFIG = "config.yaml"
TRAINING_CHECKPOINT = "checkpoint.pth"
# espnet2.bin.lightning_train's checkpoints (training state, or weights with the training
# arguments), written beside the averaged *.pth; last.ckpt is a link.
LIGHTNING_SUFFIX = ".ckpt"


@dataclass
class ExportReport:
    """What :func:`convert_experiment` did."""

    src: Path
    dst: Path
    to: str
    layers: list = field(default_factory=list)  # config paths of the layers renamed
    converted: list = field(default_factory=list)  # (file name, n layers converted)
    copied: list = field(default_factory=list)  # already in the layout
    links: list = field(default_factory=list)  # (link name, target name)
    skipped: list = field(default_factory=list)  # (name, why)
    prefixes: set = field(default_factory=set)  # parameter prefixes of our layers in the model files
    frozen: list = field(default_factory=list)  # (freeze_param entries before, after) where rewritten
    arguments: list = field(default_factory=list)  # *.ckpt in the layout whose saved arguments were rewritten

    def lines(self):
        name = f"stock {STOCK_NAME}" if self.to == "stock" else OUR_NAME
        in_place = self.dst.resolve() == self.src.resolve()
        out = [f"read {self.src / CONFIG}: {len(self.layers)} attention layer(s) -> {name}"
               + (f" ({', '.join(self.layers)})" if self.layers else "")]
        out += [f"converted {file}: {n} attention layer(s) to {self.to}" for file, n in self.converted]
        out += [f"{'left' if in_place else 'copied'} {file}: nothing to convert"
                + (" (its saved training arguments rewritten as config.yaml)" if file in self.arguments else "")
                for file in self.copied]
        out += [f"{'kept link' if in_place else 'linked'} {link} -> {target}" for link, target in self.links]
        out += [f"skipped {file}: {why}" for file, why in self.skipped]
        out += [f"freeze_param: {', '.join(before)} -> {', '.join(after)}" for before, after in self.frozen]
        out.append(f"wrote {self.dst / CONFIG} and {len(self.converted) + len(self.copied) + len(self.links)} "
                   f"model file(s) in {self.dst}")
        return out


def export_experiment(src, dst, *, force=False, allow_globals=(), drop_optimizer_state=False):
    """:func:`convert_experiment` to the stock layout."""
    return convert_experiment(src, dst, to="stock", force=force, allow_globals=allow_globals,
                              drop_optimizer_state=drop_optimizer_state)


def convert_experiment(src, dst, *, to, force=False, allow_globals=(), drop_optimizer_state=False):
    """Write ``dst``: ``src``'s ``config.yaml`` with its attention layers in the layout ``to``
    (``"stock"``: ``mha`` without our options, for stock ESPnet; ``"fused"``: ``flash_mha``),
    and each of its ``*.pth`` model files and ``*.ckpt`` Lightning checkpoints
    (``espnet2.bin.lightning_train``) in that layout, with their file modes (links to
    model files of the folder, such as ``valid.acc.ave.pth`` or ``last.ckpt``, stay links). ``dst`` may be
    ``src`` (with ``force``): the folder is converted in place, e.g. to resume a stock run
    with ``flash_mha``, whose end-of-training averaging reads the older ``*epoch.pth``
    files with the new ones and fails on mixed layouts.

    ``checkpoint.pth`` and the ``*.ckpt`` files (training state) are converted with their
    optimizer state (see :mod:`espnet_mha.optimizer_state`; without it if
    ``drop_optimizer_state``), so ESPnet (or Lightning) can resume the run, and a ``*.ckpt``
    file's saved training arguments follow the config. They need ``allow_globals``
    (ESPnet's reporter holds ``datetime.timedelta``; Lightning's files the arguments, an
    ``argparse.Namespace``); when one cannot be read or converted it is skipped (in place,
    that stops the conversion), as are links to what is not converted, dangling links and ``*.pth``
    files that are no model, and the report says why. Other files (logs, images,
    decoding results) are not copied. All is written to a temporary folder in ``dst`` and
    moved into place at the end, so an error leaves ``dst`` as it was.

    Raises:
        ValueError: ``to`` is not a layout.
        ConversionError: no ``config.yaml``; a causal layer (to stock); a model file that
            cannot be read (see :func:`espnet_mha.checkpoint_io.load_weights_only`).
        FileExistsError: a file to write exists and not ``force`` (checked before writing).
    """
    import yaml
    from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump

    if to not in ("stock", "fused"):
        raise ValueError(f"to must be 'stock' or 'fused', got {to!r}")
    src, dst = Path(src), Path(dst)
    if not (src / CONFIG).is_file():
        raise ConversionError(f"{src}: no {CONFIG} (an ESPnet experiment folder has one next to its model files)")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst} is a file: a folder EXP_DIR ({src}) is converted into a folder OUT_DIR")
    in_place = dst.exists() and dst.resolve() == src.resolve()
    with open(src / CONFIG, encoding="utf-8") as f:
        try:
            loaded = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ConversionError(f"{src / CONFIG}: not YAML ESPnet can read ({error})") from None
    config, layers = (stock_config if to == "stock" else fused_config)(loaded)
    report = ExportReport(src, dst, to, layers)
    files, links = _plan(src, report)
    if not force:
        taken = [dst / n for n in [CONFIG, *(p.name for p in files), *links]
                 if (dst / n).exists() or (dst / n).is_symlink()]
        if taken:
            raise FileExistsError(f"{', '.join(map(str, taken))} exist(s); pass --force (force=True) to overwrite"
                                  + (" (OUT_DIR is EXP_DIR: convert it in place)" if in_place else ""))
    made = _first_missing(dst)  # removed again if the conversion fails (a probe found it left empty)
    dst.mkdir(parents=True, exist_ok=True)
    # Everything is written into a temporary folder first and moved into place at the
    # end, so a failure (an unreadable file, a refused class) leaves OUT_DIR as it was.
    work = Path(tempfile.mkdtemp(dir=dst, prefix=".espnet-mha-convert."))
    done = False
    try:
        written = {p.name for p in files if _convert_file(p, work / p.name, to, report, allow_globals,
                                                          drop_optimizer_state, loaded, in_place)}
        for name, target in links.items():
            if in_place:
                report.links.append((name, target))  # the link stays; its target is converted or not
            elif target in written:
                (work / name).symlink_to(target)
                report.links.append((name, target))
            else:
                report.skipped.append((name, f"a link to {target}, which is not exported"))
        converted = [f"{file}: {n}" for file, n in report.converted if n]
        target = STOCK_NAME if to == "stock" else OUR_NAME
        named = rename_layers(config, lambda item, path: item if item.get("_name_") == target else None)[1]
        if converted and not named:
            # ESPnet would build the config's layers and load the converted weights beside them
            # with strict=False (--init_param, averaging): silently without their q/k/v.
            raise ConversionError(
                f"{src / CONFIG} names no {target!r} layer (_name_: {target}; after the conversion), but the "
                f"model files hold attention layers to convert ({', '.join(converted)}): the converted weights "
                "would not fit the layers the config builds. Is it this experiment's config.yaml, with its "
                "decoder's layer list?")
        if isinstance(config, dict) and config.get("freeze_param"):
            config = config | {"freeze_param": freeze_names(config["freeze_param"], report.prefixes, to, report)}
        with open(work / CONFIG, "w", encoding="utf-8") as f:
            yaml_no_alias_safe_dump(config, f, indent=4, sort_keys=False)
        shutil.copymode(src / CONFIG, work / CONFIG)
        for path in sorted(work.iterdir()):
            os.replace(path, dst / path.name)
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not done and made is not None:
            shutil.rmtree(made, ignore_errors=True)
    return report


def _first_missing(path):
    """The outermost folder of ``path`` that does not exist yet (None if ``path`` exists)."""
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


_PROJECTION = re.compile(r"\.(linear_q|linear_k|linear_v|linear_qkv)(\.weight|\.bias)?$")


def freeze_names(names, prefixes, to, report):
    """ESPnet's ``freeze_param`` entries (parameter name prefixes) for the layout ``to``: an
    entry naming ``linear_q``, ``linear_k`` and ``linear_v`` of one of our layers (whose
    parameter prefixes are ``prefixes``) becomes one ``linear_qkv`` entry (to fused), and a
    ``linear_qkv`` entry three (to stock); otherwise they would freeze nothing, and the
    converted run would train what the original froze. Rewrites go to ``report.frozen``.

    Raises:
        ConversionError: entries freeze part of one layer's q/k/v (to fused): the fused
            projection is frozen or trained as one.
    """
    out, groups = [], {}
    for name in names:
        match = _PROJECTION.search(name) if isinstance(name, str) else None
        if match is None or name[:match.start()] not in prefixes or (match.group(1) == "linear_qkv") != (to == "stock"):
            out.append(name)
            continue
        layer, suffix = name[:match.start()], match.group(2) or ""
        if to == "stock":
            out += [f"{layer}.linear_{x}{suffix}" for x in "qkv"]
            report.frozen.append(([name], out[-3:]))
            continue
        if (layer, suffix) not in groups:
            groups[layer, suffix] = []
            out.append((layer, suffix))  # where the fused entry goes
        groups[layer, suffix].append(name)
    for (layer, suffix), given in groups.items():
        if sorted(n[len(layer) + 1:len(n) - len(suffix)] for n in set(given)) != ["linear_k", "linear_q", "linear_v"]:
            raise ConversionError(f"freeze_param freezes {', '.join(given)} but not all of q, k and v of {layer}: "
                                  "the fused linear_qkv is frozen or trained as one. Freeze all three, or keep the "
                                  "stock parameters (state_dict_layout: stock)")
        report.frozen.append((given, [f"{layer}.linear_qkv{suffix}"]))
    return [f"{item[0]}.linear_qkv{item[1]}" if isinstance(item, tuple) else item for item in out]


def _plan(src, report):
    """(model files to export, {link name: target name}) of ``src``'s ``*.pth`` and ``*.ckpt``
    entries; what is left out goes to ``report.skipped``. A link to a model file of the folder
    stays a link (by the target's name); a link elsewhere is exported as a file."""
    entries = sorted([*src.glob("*.pth"), *src.glob("*" + LIGHTNING_SUFFIX)])
    regular = {p.name for p in entries if p.is_file() and not p.is_symlink()}
    files, links = [], {}
    for path in entries:
        if path.is_symlink():
            target = path.resolve()
            if not target.is_file():
                what = "a folder, not converted" if target.is_dir() else "which does not exist"
                report.skipped.append((path.name, f"a link to {os.readlink(path)}, {what}"))
                continue
            if target.parent == src.resolve() and target.name in regular:
                links[path.name] = target.name
                continue
        elif path.is_dir():
            # Lightning saves sharded (FSDP, DeepSpeed) checkpoints as folders named *.ckpt.
            report.skipped.append((path.name, "a folder (a sharded checkpoint?), not converted: convert it to "
                                              "one file first (e.g. Lightning's convert_zero_checkpoint_to_fp32_"
                                              "state_dict or torch.distributed.checkpoint's dcp_to_torch_save)"))
            continue
        elif not path.is_file():
            continue
        files.append(path)
    for path in sorted(src.glob("checkpoint_*")):
        if path.is_dir():  # espnet2.train.deepspeed_trainer's model.save_checkpoint(output_dir / f"checkpoint_{epoch}")
            report.skipped.append((path.name, "a DeepSpeed checkpoint folder (ESPnet's DeepSpeed trainer), not "
                                              "converted: resuming or averaging from it needs the old layout; "
                                              "convert it to one file first (DeepSpeed's zero_to_fp32.py)"))
    return files, links


def _convert_file(path, out, to, report, allow_globals, drop_optimizer_state, config, in_place):
    """Write ``path`` in the layout ``to`` to ``out`` (with ``path``'s file mode); whether it
    did. In place, a file already in that layout is left as it is."""
    from espnet_mha.convert import convert_object

    training = path.name == TRAINING_CHECKPOINT or path.suffix == LIGHTNING_SUFFIX
    try:
        # A model file that cannot be read (damaged, or classes to admit) stops the export;
        # the training state is optional: it is skipped, with the reason.
        obj = load_weights_only(path, allow_globals=allow_globals)
    except ConversionError as error:
        if not training:
            raise
        return _skip_training_state(path, error, report, in_place)
    try:
        kind, state = model_state(obj, path=path)
    except ConversionError:
        report.skipped.append((path.name, "not an ESPnet model file"))
        return False
    state, stripped = strip_wrapper_prefixes(state)
    stock, fused = stock_layers(state), fused_layers(state)
    report.prefixes.update(p.rstrip(".") for p in (*stock, *fused))
    if not (stripped or (fused if to == "stock" else stock)):
        rewritten = lightning_arguments(obj, to) if kind == LIGHTNING else obj
        if rewritten is not obj:  # the weights are in the layout; the saved arguments are not
            save_atomic(rewritten, out, force=True)
            shutil.copymode(path, out)
            report.arguments.append(path.name)
        elif not in_place:
            shutil.copyfile(path, out)
        report.copied.append(path.name)
        return True
    try:
        converted, done = convert_object(obj, src=path, dst=out, to=to,
                                         drop_optimizer_state=drop_optimizer_state, config=config)
    except ConversionError as error:
        if kind == FLAT:
            raise
        return _skip_training_state(path, error, report, in_place)
    except (KeyError, ValueError, TypeError) as error:  # a layer's error names the layer; the user needs the file
        raise naming_file(path, error) from error
    save_atomic(converted, out, force=True)
    report.converted.append((path.name, len(done.layers)))
    shutil.copymode(path, out)
    return True


def _skip_training_state(path, error, report, in_place):
    """A training checkpoint that cannot be read or converted: skipped when writing another
    folder; in place it stops the conversion, since a resumed run would then meet the old
    layout's checkpoint beside the new layout's model files and config (and ESPnet
    rewrites config.yaml from the run's own config, which may pair a stock config with
    fused files, loaded with strict=False: q/k/v dropped without a word)."""
    if in_place:
        raise ConversionError(f"{error} (in place, {path.name} must convert with the rest of the folder: nothing "
                              "was changed)") from None
    report.skipped.append((path.name, f"training state not converted (--resume in the new folder would start "
                                      f"training afresh, without a word from ESPnet): {error}"))
    return False
