"""``espnet-mha-convert`` writing OUT atomically: overwrite refusals, failed writes, folders, argument errors."""

import errno
import re

import pytest
import torch

from checkpoint_cases import assert_same_state
from convert_cases import leftovers, run
from espnet_mha import checkpoint_io
from espnet_mha.convert import ConversionError, convert_file, load_weights_only, save_atomic

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_refuses_to_overwrite_unless_forced(exp, tmp_path, capsys):
    dst = tmp_path / "out.pth"
    dst.write_bytes(b"precious")
    assert run(exp.ave, dst, "--to", "fused") == 1
    assert f"{dst} exists; pass --force" in capsys.readouterr().err
    assert dst.read_bytes() == b"precious"
    with pytest.raises(FileExistsError, match=r"out\.pth exists; pass --force \(force=True\) to overwrite it"):
        convert_file(exp.ave, dst, to="fused")
    assert run(exp.ave, dst, "--to", "fused", "--force") == 0
    in_place = tmp_path / "in_place.pth"
    in_place.write_bytes(exp.ave.read_bytes())
    assert run(in_place, in_place, "--to", "fused", "--force") == 0
    assert_same_state(torch.load(in_place, weights_only=True), torch.load(dst, weights_only=True))
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt("interrupted while saving")],
                         ids=["oserror", "ctrl-c"])
def test_failed_write_leaves_nothing_and_keeps_the_old_file(exp, tmp_path, monkeypatch, error):
    """A write that fails, with an OSError or with something else (Ctrl-C, which a coverage
    audit found untested): the error reaches the caller as it is (the command line's too,
    for what it does not report itself), the temporary file is removed and the file at the
    destination is left as it was."""
    dst = tmp_path / "out.pth"
    dst.write_bytes(b"old")

    def broken_save(obj, f):
        f.write(b"partial")
        raise error

    monkeypatch.setattr(checkpoint_io.torch, "save", broken_save)
    with pytest.raises(type(error), match=str(error)):
        convert_file(exp.ave, dst, to="fused", force=True)
    if not isinstance(error, OSError):
        with pytest.raises(type(error), match=str(error)):
            run(exp.ave, dst, "--to", "fused", "--force")
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth"]


@pytest.mark.parametrize("where", ["mkstemp", "replace"])
def test_a_write_error_names_the_file_asked_for(exp, tmp_path, monkeypatch, capsys, where):
    """A read-only folder fails on the hidden temporary file the write goes through; the
    error names OUT, keeps its type and errno, and leaves nothing (a probe found the
    temporary file's name in it)."""
    dst = tmp_path / "out.pth"
    hidden = str(tmp_path / ".out.pth.x.tmp")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", hidden)

    monkeypatch.setattr(checkpoint_io.tempfile if where == "mkstemp" else checkpoint_io.os, where, refuse)
    with pytest.raises(PermissionError, match=rf"Read-only file system: cannot write {re.escape(str(dst))}$") as info:
        convert_file(exp.ave, dst, to="fused")
    assert info.value.errno == errno.EROFS
    assert run(exp.ave, dst, "--to", "fused") == 1
    err = capsys.readouterr().err
    assert f"error: [Errno {errno.EROFS}] Read-only file system: cannot write {dst}" in err and hidden not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_folder_out_for_a_file_in_says_which_file_to_give(exp, tmp_path, capsys):
    """OUT an existing folder, IN a file: not "exists; pass --force", which would only
    lead to "is a directory" (a probe)."""
    out = tmp_path / "outdir"
    out.mkdir()
    for force in ((), ("--force",)):
        assert run(exp.ave, out, "--to", "fused", *force) == 1
        assert (f"error: {out} is a folder, and {exp.ave} is a file: give the file to write, "
                f"e.g. {out / exp.ave.name}") in capsys.readouterr().err
    with pytest.raises(IsADirectoryError, match=r"outdir is a folder, and .* is a file: give the file to write"):
        convert_file(exp.ave, out, to="fused", force=True)
    assert not any(out.iterdir())
    # Through the API too, a folder named with a trailing separator (the CLI's usage error).
    with pytest.raises(IsADirectoryError, match=r"newdir names a folder, and .* is a file: give the file to write"):
        convert_file(exp.ave, f"{tmp_path / 'newdir'}/", to="fused")
    assert not (tmp_path / "newdir").exists()


def test_argument_errors(exp, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"to must be one of \('stock', 'fused'\), got 'both'"):
        convert_file(exp.ave, tmp_path / "o.pth", to="both")
    with pytest.raises(ConversionError, match=r"missing\.pth: no such file"):
        convert_file(tmp_path / "missing.pth", tmp_path / "o.pth", to="stock")
    with pytest.raises(ConversionError, match=r"^/dev/null: not a regular file"):
        convert_file("/dev/null", tmp_path / "o.pth", to="stock")
    with pytest.raises(ConversionError, match=r"--allow-global 'nosuchmodule\.Thing': cannot import it"):
        load_weights_only(exp.ave, allow_globals=["nosuchmodule.Thing"])
    with pytest.raises(FileNotFoundError, match=r"no-dir: no such directory"):
        save_atomic({}, tmp_path / "no-dir" / "o.pth")
    with pytest.raises(IsADirectoryError, match=r"is a directory"):
        save_atomic({}, tmp_path)
    with pytest.raises(FileExistsError, match=r"exists; pass --force \(force=True\)"):
        save_atomic({}, exp.ave)
    with pytest.raises(SystemExit):
        run(exp.ave, tmp_path / "o.pth")  # --to is required
    assert "the following arguments are required: --to" in capsys.readouterr().err
    assert run(exp.ave, tmp_path / "o.pth", "--to", "fused", "--layer-pattern", "(") == 1
    assert "layer_pattern '(' is not a valid regular expression" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a file written as "newdir", named like the folder (an audit)
        run(exp.ave, f"{tmp_path / 'newdir'}/", "--to", "fused")
    assert f"names a folder, and IN is a file: give the file to write, e.g. '{tmp_path / 'newdir' / exp.ave.name}'" \
        in capsys.readouterr().err
    assert not (tmp_path / "newdir").exists()


def test_an_object_torch_save_cannot_pickle_leaves_nothing(tmp_path):
    """The error reaches the caller as it is and the temporary file is removed (a coverage
    audit: untested)."""
    with pytest.raises(AttributeError, match=r"Can't pickle local object"):
        save_atomic({"f": lambda: 0}, tmp_path / "out.pth")
    assert list(tmp_path.iterdir()) == []
