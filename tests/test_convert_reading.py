"""``espnet-mha-convert`` reading IN: classes refused unless allowed, unreadable files, files that are no checkpoint."""

import datetime
import importlib
import re
import zipfile

import numpy
import pytest
import torch

from convert_cases import leftovers, run
from espnet_mha.convert import ConversionError, convert_file, load_weights_only

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_numpy_values_name_their_globals(tmp_path):
    src = tmp_path / "stats.pth"
    torch.save({"model": {"layers.0.layer.linear_qkv.weight": torch.zeros(6, 2),
                          "layers.0.layer.linear_qkv.bias": torch.zeros(6)},
                "reporter": {"loss": numpy.float64(1.5), "time": datetime.timedelta(seconds=1)}}, src)
    scalar = numpy.float64(0).__reduce__()[0]  # numpy._core.multiarray.scalar (numpy.core before numpy 2)
    scalar = f"{scalar.__module__}.{scalar.__name__}"
    where = r" at \['reporter'\]\['loss'\]" if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint") else ""
    with pytest.raises(ConversionError, match=rf"{re.escape(scalar)}{where}"):
        load_weights_only(src)
    allowed = [scalar, "numpy.dtype", "datetime.timedelta"]
    assert load_weights_only(src, allow_globals=allowed)["reporter"]["loss"] == 1.5
    convert_file(src, tmp_path / "out.pth", to="stock", allow_globals=allowed)
    assert sorted(torch.load(tmp_path / "out.pth", weights_only=False)["model"]) == [
        f"layers.0.layer.linear_{n}.{p}" for n in "kqv" for p in ("bias", "weight")]


@pytest.mark.skipif(not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"),
                    reason="torch < 2.6 admits a global only under its own name")
def test_a_global_named_as_an_older_release_named_it_is_admitted_by_that_name(tmp_path):
    """numpy 1.x pickles its scalars as numpy.core.multiarray.scalar, which numpy 2 calls
    numpy._core.multiarray.scalar: a training file written under numpy 1 (ESPnet's reporter
    keeps numpy floats) and converted under numpy 2 named the flag it needed, and that flag
    was refused again. The file is written here under the other name than this numpy's."""
    scalar = numpy.float64(0).__reduce__()[0]
    own = scalar.__module__
    other = "numpy.core.multiarray" if own == "numpy._core.multiarray" else "numpy._core.multiarray"
    src = tmp_path / "checkpoint.pth"
    scalar.__module__ = other
    try:
        torch.save({"model": {"layers.0.layer.linear_qkv.weight": torch.zeros(6, 2),
                              "layers.0.layer.linear_qkv.bias": torch.zeros(6)},
                    "reporter": {"loss": numpy.float64(1.5)}}, src)
    finally:
        scalar.__module__ = own
    flag = f"{other}.scalar"
    try:
        importlib.import_module(other)
    except ImportError:
        pytest.skip(f"{other} cannot be imported with this numpy")
    with pytest.raises(ConversionError, match=rf"--allow-global {re.escape(flag)}"):
        load_weights_only(src)
    assert load_weights_only(src, allow_globals=[flag, "numpy.dtype"])["reporter"]["loss"] == 1.5
    convert_file(src, tmp_path / "out.pth", to="stock", allow_globals=[flag, "numpy.dtype"])


@pytest.mark.parametrize("damage", ["truncated", "tail", "empty", "garbage"])
def test_unreadable_files_say_so_and_leave_nothing(exp, tmp_path, capsys, damage):
    data = exp.ave.read_bytes()
    content = {"truncated": data[: len(data) // 2], "tail": data[:100], "empty": b"", "garbage": b"hello" * 20}
    src, dst = tmp_path / "bad.pth", tmp_path / "out.pth"
    src.write_bytes(content[damage])
    assert run(src, dst, "--to", "fused") == 1
    assert "bad.pth: cannot read it (" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]
    with pytest.raises(ConversionError, match=r"cannot read it \(.*\); is it truncated, or not written by torch"):
        load_weights_only(src)


def test_an_espnet_pack_archive_is_named_as_one(exp, tmp_path):
    """espnet2.bin.pack writes a zip with meta.yaml beside the model files, which torch.load
    cannot read: the error said "is it truncated, or not written by torch.save?" (an audit)."""
    src = tmp_path / "model.zip"
    with zipfile.ZipFile(src, "w") as archive:
        archive.writestr("meta.yaml", "files: {asr_model_file: exp/valid.acc.ave.pth}\n")
        archive.write(exp.ave, "exp/valid.acc.ave.pth")
    with pytest.raises(ConversionError, match=r"model\.zip: an ESPnet pack archive .*unpack it, then convert"):
        load_weights_only(src)


def test_legacy_pickle_with_other_classes_is_refused(tmp_path):
    src = tmp_path / "legacy.pth"
    torch.save({"time": datetime.timedelta(1)}, src, _use_new_zipfile_serialization=False)
    with pytest.raises(ConversionError, match=r"refused it \(UnpicklingError: Unsupported global: GLOBAL "
                                              r"datetime\.timedelta.*\); --allow-global datetime\.timedelta admits it"):
        load_weights_only(src)


def test_without_torchs_static_check_torch_load_still_refuses(tmp_path, monkeypatch):
    """torch < 2.6 has no get_unsafe_globals_in_checkpoint: the file is refused by
    torch.load(weights_only=True) itself (in its words), and --allow-global still admits."""
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
    src = tmp_path / "checkpoint.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "time": datetime.timedelta(1)}, src)
    with pytest.raises(ConversionError, match=r"refused it \(UnpicklingError: .*datetime\.timedelta.*\); "
                                              r"--allow-global datetime\.timedelta admits it if you trust it"):
        load_weights_only(src)
    assert load_weights_only(src, allow_globals=["datetime.timedelta"])["time"] == datetime.timedelta(1)


@pytest.mark.parametrize("content, message", [
    ([torch.zeros(1)], r"neither a state dict \(it holds a list\) nor an ESPnet training checkpoint"),
    ({}, r"neither a state dict \(it holds an empty dict\)"),
    ({"w": torch.zeros(1), "step": 3}, r"neither a state dict \(entry 'step' is a int, not a tensor\)"),
    ({0: torch.zeros(1)}, r"neither a state dict \(key 0 is a int, not a name\)"),
])
def test_not_a_checkpoint(tmp_path, content, message):
    src = tmp_path / "odd.pth"
    torch.save(content, src)
    with pytest.raises(ConversionError, match=message):
        convert_file(src, tmp_path / "out.pth", to="stock")


def test_a_pickle_not_written_by_torch_save_is_unreadable_not_refused(tmp_path):
    """A dict pickled with pickle.dump: the weights-only unpickler stops at an opcode it does not
    take. That is no class to admit, so the message says the file is unreadable (and gives no
    --allow-global hint); nothing is written."""
    import pickle

    src, dst = tmp_path / "pickled.pth", tmp_path / "out.pth"
    src.write_bytes(pickle.dumps({"w": [1.0]}, protocol=0))
    with pytest.raises(ConversionError, match=r"pickled\.pth: cannot read it \(UnpicklingError: Unsupported operand "
                                              r"\d+\); is it truncated, or not written by torch\.save\?$"):
        convert_file(src, dst, to="fused")
    assert not dst.exists() and not leftovers(tmp_path)
