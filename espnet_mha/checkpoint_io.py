"""Reading and writing checkpoint files safely: weights-only loading, atomic saving.

Used by :mod:`espnet_mha.convert`. ``load_weights_only`` never unpickles
arbitrary objects: a file holding other classes is refused with the key where
they are and the ``--allow-global`` flags that would admit them.
"""

import contextlib
import importlib
import os
import pickle
import re
import stat
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

MODEL_ENTRY = "model"
FLAT = "flat state dict"
TRAINING = "ESPnet training checkpoint"
LIGHTNING = "Lightning checkpoint"
# Where each kind of training file keeps the model's state dict and its optimizers' states:
# ESPnet's checkpoint.pth, and the *.ckpt files of espnet2.bin.lightning_train (Lightning's
# own format: the LightningModule's state dict, ESPnet's model under "model.").
ENTRIES = {TRAINING: (MODEL_ENTRY, "optimizers"), LIGHTNING: ("state_dict", "optimizer_states")}
# How the weights-only unpickler words a refused class (as opposed to a damaged file).
_CLASS_REFUSALS = ("Unsupported global", "allowlisted", "unrecognized function")


class ConversionError(ValueError):
    """A checkpoint file cannot be read or converted (the message says why and what to do)."""


# ------------------------------------------------------------------ reading
class _StandIn:
    """Takes the place of a refused class so that we can say where it is without building it."""

    global_name = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state):
        pass


def _resolve_global(name):
    module_name, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConversionError(f"--allow-global {name!r}: cannot import it ({error})") from None
    if name == "numpy.dtype":
        # A numpy dtype is rebuilt as an instance of its concrete class (numpy.dtypes.Float64DType...).
        numpy = importlib.import_module("numpy")
        dtypes = getattr(numpy, "dtypes", None)  # numpy >= 1.25
        if dtypes is None:  # older numpy (ESPnet 202412 and before pin < 1.24) has the classes, unnamed
            return [obj, *sorted({type(obj(code)) for code in numpy.typecodes["All"]}, key=str)]
        return [obj, *(getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType"))]
    own = f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', None)}"
    if own != name and hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        # A file names a global as the release that wrote it did: numpy 1.x's
        # numpy.core.multiarray.scalar is numpy._core.multiarray.scalar under numpy 2, and
        # torch admits a global under its own name unless told the file's (a (global, name)
        # pair, torch >= 2.6, as the static check). An audit found the flag the refusal
        # named refused again.
        return [obj, (obj, name)]
    return [obj]


def _reason(error):
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _unreadable(path, error):
    if _packed_model(path):
        return ConversionError(f"{path}: an ESPnet pack archive (espnet2.bin.pack: meta.yaml beside the model "
                               "files), not a torch.save file: unpack it, then convert the model file in it, and "
                               "pack again")
    return ConversionError(f"{path}: cannot read it ({_reason(error)}); is it truncated, or not written by torch.save?")


def _packed_model(path):
    """Whether ``path`` is a zip archive as ``espnet2.bin.pack`` writes one (``meta.yaml`` at its top)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "meta.yaml" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _where(obj, path, found):
    if isinstance(obj, _StandIn):
        found.setdefault(obj.global_name, []).append(path or "the top level")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _where(value, f"{path}[{key!r}]", found)
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _where(value, f"{path}[{index}]", found)
    return found


def _refusal(path, unsafe, allowed):
    stand_ins = [(type("StandIn", (_StandIn,), {"global_name": name}), name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(allowed + stand_ins):
            found = _where(torch.load(path, map_location="cpu", weights_only=True), "", {})
    except Exception:  # noqa: BLE001 (only the locations are missing from the message then)
        found = {}
    lines = [f"{path}: torch.load(weights_only=True) refuses {len(unsafe)} class(es) that are not tensors:"]
    for name in unsafe:
        where = found.get(name, [])
        more = f" (and {len(where) - 1} more)" if len(where) > 1 else ""
        lines.append(f"  {name}" + (f" at {where[0]}{more}" if where else ""))
    lines.append("Weights-only loading never builds other classes, since building them runs their code. "
                 "If you trust this file, allow exactly these with: "
                 + " ".join(f"--allow-global {name}" for name in unsafe))
    return ConversionError("\n".join(lines))


def load_weights_only(path, *, allow_globals=()):
    """Load a ``torch.save`` file with ``torch.load(weights_only=True)`` on the CPU.

    Args:
        path: the file.
        allow_globals: names (``"datetime.timedelta"``) of classes or functions
            to admit besides torch's weights-only set (``numpy.dtype`` admits
            numpy's concrete dtype classes too).

    Returns:
        the loaded object.

    Raises:
        ConversionError: no such file; unreadable or truncated; it holds classes
            outside the allowed set (names them, where they are, and the
            ``--allow-global`` flags); an allowed name cannot be imported.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: " + ("not a regular file" if path.exists() else "no such file"))
    allowed = [obj for name in allow_globals for obj in _resolve_global(name)]
    with torch.serialization.safe_globals(allowed):
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        # torch.save's format; older pickles have no static check, nor has torch < 2.6, where
        # torch.load(weights_only=True) below still refuses the classes (in its own words).
        if is_zip and hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
            try:
                unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            except Exception as error:  # noqa: BLE001 (miniz, zipfile and pickle errors alike)
                raise _unreadable(path, error) from error
            if unsafe:
                raise _refusal(path, unsafe, allowed)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if any(sign in str(error) for sign in _CLASS_REFUSALS):
                # torch < 2.6 names one class per refusal ("GLOBAL datetime.timedelta was not an
                # allowed global"): the flag for it, where it can be read from the message.
                named = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
                hint = (f"--allow-global {named.group(1)} admits it if you trust it (torch < 2.6 names one class "
                        "at a time: more may follow)" if named else "--allow-global NAME admits a class you trust")
                raise ConversionError(f"{path}: torch.load(weights_only=True) refused it ({_reason(error)}); "
                                      + hint) from error
            raise _unreadable(path, error) from error
        except Exception as error:  # noqa: BLE001 (torch.load raises OSError, RuntimeError, EOFError, KeyError...)
            raise _unreadable(path, error) from error


def naming_file(path, error):
    """``error`` (a KeyError, ValueError or TypeError of a layer, which names the layer's
    keys) as the same kind of error that names the file ``path`` too."""
    # Not type(error): not every subclass takes one message.
    kind = next(base for base in (KeyError, ValueError, TypeError) if isinstance(error, base))
    return kind(f"{path}: {error.args[0] if error.args else error}")


def training_kind(obj):
    """``TRAINING`` or ``LIGHTNING`` when ``obj`` is one of the training files of :data:`ENTRIES`
    (the model's state dict is then in an entry), else None."""
    if isinstance(obj, Mapping) and isinstance(obj.get(MODEL_ENTRY), dict):
        return TRAINING
    if isinstance(obj, Mapping) and "pytorch-lightning_version" in obj and isinstance(obj.get("state_dict"), dict):
        return LIGHTNING
    return None


def model_state(obj, *, path="checkpoint"):
    """The model's state dict inside a loaded file, and which of ESPnet's files it is.

    Returns:
        (kind, state_dict): kind is ``FLAT`` (the object is the state dict),
        ``TRAINING`` (``checkpoint.pth``: the state dict is ``obj["model"]``) or
        ``LIGHTNING`` (a Lightning ``*.ckpt``: ``obj["state_dict"]``, beside
        ``"pytorch-lightning_version"``).

    Raises:
        ConversionError: the object is none of them (names what it found).
    """
    kind = training_kind(obj)
    if kind is not None:
        return kind, obj[ENTRIES[kind][0]]
    if isinstance(obj, dict) and obj:
        wrong = next(((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        key = next((k for k in obj if not isinstance(k, str)), None)  # a review: named no file before
        if wrong is None and key is None:
            return FLAT, obj
        found = (f"entry {wrong[0]!r} is a {type(wrong[1]).__name__}, not a tensor" if wrong is not None
                 else f"key {key!r} is a {type(key).__name__}, not a name")
    else:
        found = f"it holds {'an empty dict' if isinstance(obj, dict) else 'a ' + type(obj).__name__}"
    raise ConversionError(f"{path}: neither a state dict ({found}) nor an ESPnet training checkpoint "
                          f"(a dict whose {MODEL_ENTRY!r} entry is the state dict) nor a Lightning checkpoint "
                          "(with 'pytorch-lightning_version' and a 'state_dict' entry)")


# ------------------------------------------------------------------ writing
def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _naming(error, path):
    """``error`` (an OSError on the temporary file :func:`save_atomic` writes) as the same
    error about ``path``: the user named ``path``, not the hidden file beside it."""
    if error.errno:
        return type(error)(error.errno, f"{error.strerror}: cannot write {path}")
    return type(error)(f"{error}: cannot write {path}")


def save_atomic(obj, path, *, force=False):
    """``torch.save`` to a temporary file in ``path``'s folder, fsync, then rename onto ``path``.

    Readers never see a partial file; on any error the temporary file is
    removed and ``path`` is left as it was. A symlink at ``path`` is replaced by
    the file (its target is left alone).

    Raises:
        FileExistsError: ``path`` exists and not ``force``.
        FileNotFoundError: ``path``'s folder does not exist.
        IsADirectoryError: ``path`` is a folder.
        OSError: the file cannot be written (read-only folder, full disk); the message
            names ``path``, not the temporary file.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    if (path.exists() or path.is_symlink()) and not force:
        raise FileExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory (for {path})")
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _naming(error, path) from error
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise _naming(error, path) from error
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not every filesystem allows it
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
