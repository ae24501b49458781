"""``espnet-mha-convert``: checkpoint files between the stock and our fused attention layout.

Usage::

    espnet-mha-convert IN OUT --to stock|fused [--force] [--layer-pattern REGEX]
                       [--allow-global NAME]... [--drop-optimizer-state]
    espnet-mha-convert EXP_DIR OUT_DIR --to stock|fused [--force] [--allow-global NAME]...
                       [--drop-optimizer-state]
    python -m espnet_mha.convert ...

With folders: an experiment folder, its ``config.yaml`` and every model file;
OUT_DIR may be EXP_DIR (with ``--force``) to convert it in place, e.g. to resume
a stock run with ``flash_mha`` (see :mod:`espnet_mha.export`).

Reads the files ESPnet writes: a flat state dict (``valid.acc.ave.pth``), a
training checkpoint (``checkpoint.pth``: the state dict in its ``"model"``
entry) and ``espnet2.bin.lightning_train``'s Lightning checkpoints (``*.ckpt``:
the state dict in ``"state_dict"``, optimizers in ``"optimizer_states"``).
Loads with ``torch.load(weights_only=True)`` only, on the CPU (so OUT holds CPU
tensors): a file holding other classes is refused with the key where
they are and the ``--allow-global`` flags that would admit them. Removes
``module.``/``_orig_mod.`` prefixes, converts only our layers' keys (see
:mod:`espnet_mha.checkpoint`), writes OUT atomically (temporary file, fsync, rename).

An optimizer state indexes parameters by position, and fusing q/k/v changes the
parameter list: a training checkpoint's optimizer state is converted with it
(element-wise optimizers such as Adam; see :mod:`espnet_mha.optimizer_state`), so
ESPnet resumes the run as it was. The ``config.yaml`` beside IN, if any, says
whether its model state holds every parameter (frozen ones too). What cannot be
converted exactly is refused unless ``--drop-optimizer-state`` (ESPnet's resume
then starts the optimizer afresh).
"""

import argparse
import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from espnet_mha.checkpoint import to_fused, to_stock
from espnet_mha.checkpoint_io import (  # noqa: F401  (re-exported: the converter's public helpers)
    ENTRIES,
    FLAT,
    LIGHTNING,
    MODEL_ENTRY,
    TRAINING,
    ConversionError,
    load_weights_only,
    model_state,
    naming_file,
    save_atomic,
)
from espnet_mha.checkpoint_keys import DEFAULT_LAYER_PATTERN, fused_layers, stock_layers, strip_wrapper_prefixes
from espnet_mha.configs import config_beside, lightning_arguments, stock_config_warning
from espnet_mha.export import convert_experiment
from espnet_mha.optimizer_state import convert_optimizer_state

PROG = "espnet-mha-convert"
LAYOUTS = ("stock", "fused")


# --------------------------------------------------------------- converting
@dataclass
class Report:
    """What :func:`convert_file` did."""

    src: Path
    dst: Path
    to: str
    kind: str
    n_keys: int
    layers: list = field(default_factory=list)
    stripped: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)
    dropped_optimizers: int = 0
    converted_optimizers: int = 0
    warnings: list = field(default_factory=list)

    def lines(self):
        where = f"state dict in entry {ENTRIES[self.kind][0]!r}, " if self.kind in ENTRIES else ""
        out = [f"read {self.src}: {self.kind} ({where}{self.n_keys} keys)",
               f"stripped wrapper prefixes: {', '.join(self.stripped)}" if self.stripped else "no wrapper prefixes",
               f"converted {len(self.layers)} attention layer(s) to {self.to}: "
               + (", ".join(layer or "(a bare layer's keys, no prefix)" for layer in self.layers) or "none")]
        if self.left_alone:
            out.append(f"left alone {len(self.left_alone)} other layer(s) with linear_q/k/v (outside --layer-pattern): "
                       + ", ".join(self.left_alone))
        if self.converted_optimizers:
            out.append(f"converted the state of {self.converted_optimizers} optimizer(s) to the {self.to} "
                       "parameter list")
        if self.dropped_optimizers:
            out.append(f"dropped the state of {self.dropped_optimizers} optimizer(s) (--drop-optimizer-state)")
        out.append(f"wrote {self.dst}")
        out += [f"warning: {w}" for w in self.warnings]
        return out


def convert_file(src, dst, *, to, force=False, layer_pattern=DEFAULT_LAYER_PATTERN, allow_globals=(),
                 drop_optimizer_state=False):
    """Convert a checkpoint file to the stock or our fused layout (see the module docs).

    Args:
        src, dst: input and output paths (``dst`` may equal ``src`` with ``force``).
        to: ``"stock"`` or ``"fused"``.
        force: overwrite ``dst``.
        layer_pattern: which stock layers are ours, for ``to="fused"``; see
            :func:`espnet_mha.checkpoint_keys.stock_layers` (``""`` matches every layer).
        allow_globals: see :func:`load_weights_only`.
        drop_optimizer_state: write a training checkpoint without its optimizer state
            (else it is converted to the new parameter list).

    Returns:
        Report.

    Raises:
        ValueError: ``to`` is not a layout.
        IsADirectoryError: ``dst`` is a folder, or a string ending in a path separator.
        FileExistsError: ``dst`` exists and not ``force`` (checked before reading).
        ConversionError: see :func:`load_weights_only` and :func:`model_state`;
            nothing to convert; optimizer state that cannot be converted (see
            :mod:`espnet_mha.optimizer_state`) without ``drop_optimizer_state``.
        KeyError, ValueError: half-converted layers or wrong shapes (see
            :mod:`espnet_mha.checkpoint`). Nothing is written on any error.
    """
    if to not in LAYOUTS:
        raise ValueError(f"to must be one of {LAYOUTS}, got {to!r}")
    named_folder = _names_a_folder(dst)
    src, dst = Path(src), Path(dst)
    if named_folder or dst.is_dir():  # before the FileExistsError, whose --force would only meet this
        raise IsADirectoryError(f"{dst} {'names' if named_folder else 'is'} a folder, and {src} is a file: give the "
                                f"file to write, e.g. {dst / src.name}")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise FileExistsError(f"{dst} exists; pass --force (force=True) to overwrite it")
    if dst.is_symlink() and dst.exists() and dst.resolve() == src.resolve():
        # In place through a link (ESPnet's valid.acc.ave.pth -> valid.acc.ave_3best.pth): the
        # file it names is converted and the link kept. Replacing the link by a converted copy
        # left the file it named, and every other link to it, in the old layout (an audit).
        dst = dst.resolve()
    config = config_beside(src)
    obj = load_weights_only(src, allow_globals=allow_globals)
    try:
        obj, report = convert_object(obj, src=src, dst=dst, to=to, layer_pattern=layer_pattern,
                                     drop_optimizer_state=drop_optimizer_state, config=config)
    except ConversionError:
        raise  # names the file already
    except (KeyError, ValueError, TypeError) as error:  # a layer's error names the layer, as in a folder
        raise naming_file(src, error) from error
    save_atomic(obj, dst, force=force)
    if to == "fused" and report.layers:
        report.warnings += stock_config_warning(src, dst, config)
    return report


def _names_a_folder(dst):
    """Whether ``dst`` is a string ending in a path separator: ``Path()`` drops it, and the
    file was written as a file named like the folder (an audit)."""
    return isinstance(dst, str) and dst.endswith(("/", os.sep))


def convert_object(obj, *, src, dst, to, layer_pattern=DEFAULT_LAYER_PATTERN, drop_optimizer_state=False,
                   config=None):
    """:func:`convert_file` on a loaded file's object (``src``, ``dst``: for the report and
    messages): ``(the object to save, Report)``. ``config``: the training config ESPnet
    wrote beside it (a dict), if any: it says whether the model state holds every
    parameter (see :func:`espnet_mha.optimizer_state.convert_optimizer_state`). Raises as
    :func:`convert_file`."""
    kind, state = model_state(obj, path=src)
    clean, stripped = strip_wrapper_prefixes(state)
    if to == "fused":
        layers = stock_layers(clean, layer_pattern=layer_pattern)
        # Nothing matched: the report or the error below names the layers left alone (to_fused
        # would warn as well).
        converted = to_fused(clean, layer_pattern=layer_pattern) if layers else clean
        left_alone = [p for p in stock_layers(clean, layer_pattern=None) if p not in layers]
    else:
        layers, converted, left_alone = fused_layers(clean), to_stock(clean), []
    if not layers and not stripped:
        raise ConversionError(_nothing_to_convert(src, to, clean, layer_pattern, left_alone))
    report = Report(src, dst, to, kind, len(state), layers, stripped, left_alone)
    if kind in ENTRIES:
        model_entry, optimizers_entry = ENTRIES[kind]
        obj = copy.copy(obj)
        obj[model_entry] = converted
        optimizers = obj.get(optimizers_entry) or []
        n_optimizers = sum(1 for o in optimizers if o)  # with state
        if layers and n_optimizers and drop_optimizer_state:
            obj[optimizers_entry] = []
            report.dropped_optimizers = n_optimizers
        elif layers and n_optimizers:
            if n_optimizers > 1:
                raise ConversionError(
                    f"{src}: entry {optimizers_entry!r} holds {n_optimizers} optimizers (a task such as GAN "
                    "TTS gives each a part of the model), whose positions cannot be told apart. Pass "
                    "--drop-optimizer-state to write the checkpoint without them")
            complete = isinstance(config, dict) and not (
                config.get("use_adapter") and config.get("save_strategy", "all") != "all")
            obj[optimizers_entry] = [
                _convert_optimizer(o, i, clean, layers, to, src, complete, optimizers_entry) if o else o
                for i, o in enumerate(optimizers)]
            report.converted_optimizers = n_optimizers
        if kind == LIGHTNING:
            obj = lightning_arguments(obj, to)
    else:
        obj = converted
    return obj, report


def _convert_optimizer(state, index, model_state, layers, to, src, complete, entry):
    """One optimizer's state for the converted parameter list (see :mod:`espnet_mha.optimizer_state`)."""
    try:
        return convert_optimizer_state(state, model_state, layers, fuse=to == "fused", complete=complete,
                                       where=f"{src}: entry {entry!r}[{index}]")
    except ConversionError as error:
        raise ConversionError(
            f"{error}. Its positions follow the parameter list, which converting {len(layers)} layer(s) changes "
            "(ESPnet's resume would fail in optimizer.load_state_dict). Pass --drop-optimizer-state to write "
            "the checkpoint without it (a resumed run then starts the optimizer afresh)") from None


def _nothing_to_convert(src, to, state, layer_pattern, left_alone):
    if to == "stock":
        return f"{src}: nothing to convert to stock: no linear_qkv keys and no wrapper prefixes"
    message = (f"{src}: nothing to convert to fused: no linear_q/k/v keys under a layer prefix matching "
               f"--layer-pattern {layer_pattern!r} and no wrapper prefixes")
    if fused_layers(state):
        message += f"; {len(fused_layers(state))} layer(s) are fused already"
    if left_alone:
        message += f"; other layers with linear_q/k/v: {', '.join(left_alone)} (a --layer-pattern would include them)"
    return message


def _parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert an ESPnet checkpoint (flat state dict such as valid.acc.ave.pth, training "
                    "checkpoint.pth, or a Lightning *.ckpt of espnet2.bin.lightning_train) between the stock "
                    "MultiHeadedAttention layout (linear_q/k/v) and espnet_mha's fused layout (linear_qkv). "
                    "Removes module./_orig_mod. prefixes. With folders: an experiment folder, its config.yaml "
                    "(flash_mha <-> mha) and every *.pth and *.ckpt model file; --to stock for ESPnet without "
                    "espnet-mha, --to fused in place (OUT_DIR = EXP_DIR, --force) to resume a stock run with "
                    "flash_mha.",
    )
    parser.add_argument("src", metavar="IN", help="file to read (torch.load with weights_only=True), or an "
                                                  "experiment folder (config.yaml, *.pth and *.ckpt)")
    parser.add_argument("dst", metavar="OUT", help="file to write atomically (may be IN with --force), or the "
                                                   "folder to write (made if absent; IN with --force: in place)")
    parser.add_argument("--to", required=True, choices=LAYOUTS, help="layout to write")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.add_argument("--layer-pattern", default=DEFAULT_LAYER_PATTERN, metavar="REGEX",
                        help="--to fused: convert the layers whose key prefix matches (re.search); default "
                             "%(default)s, the attention layers of ESPnet's S4 decoder (and a bare layer's top-level "
                             "keys); '' matches every layer "
                             "with linear_q/k/v, a transformer encoder's too")
    parser.add_argument("--allow-global", action="append", default=[], metavar="NAME",
                        help="also admit this class when loading (repeatable), e.g. datetime.timedelta; "
                             "only for files you trust; the error for a refused file lists the names it needs")
    parser.add_argument("--drop-optimizer-state", action="store_true",
                        help="write a training checkpoint without its optimizer state (by default it is converted "
                             "to the new parameter list, for element-wise optimizers such as Adam)")
    return parser


def main(argv=None):
    """Run the converter; returns the exit status (0 done, 1 refused or failed, 2 bad usage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    folder = Path(args.src).is_dir()
    if folder and args.layer_pattern != DEFAULT_LAYER_PATTERN:
        parser.error("--layer-pattern selects layers of files; a folder converts the S4 decoder's attention layers")
    if not folder and _names_a_folder(args.dst):  # a usage error here, before anything is read
        parser.error(f"OUT {args.dst!r} names a folder, and IN is a file: give the file to write, "
                     f"e.g. {str(Path(args.dst) / Path(args.src).name)!r}")
    try:
        if folder:
            report = convert_experiment(args.src, args.dst, to=args.to, force=args.force,
                                        allow_globals=args.allow_global,
                                        drop_optimizer_state=args.drop_optimizer_state)
        else:
            report = convert_file(args.src, args.dst, to=args.to, force=args.force,
                                  layer_pattern=args.layer_pattern, allow_globals=args.allow_global,
                                  drop_optimizer_state=args.drop_optimizer_state)
    except (ConversionError, KeyError, ValueError, TypeError, OSError) as error:  # TypeError: a non-tensor entry
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
