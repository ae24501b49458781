"""``espnet-mha-convert`` on the files ESPnet writes: refusals, errors, atomic writes, ESPnet reading the results."""

import datetime
import errno
import os
import re
import subprocess
import sys

import numpy
import pytest
import torch

import espnet_asr
from espnet_mha import checkpoint_io
from espnet_mha.checkpoint import to_fused
from espnet_mha.convert import ConversionError, convert_file, load_weights_only, main, save_atomic

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
ENCODER = espnet_asr.ENCODER_ATTENTION


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return espnet_asr.Experiment(tmp_path_factory.mktemp("exp"))


@pytest.fixture(scope="module")
def checkpoint_file(exp):
    """``checkpoint.pth`` of a stock model after one training step (reporter, Adam, WarmupLR)."""
    path = exp.root / "checkpoint.pth"
    torch.save(espnet_asr.training_checkpoint(espnet_asr.build(exp.root, "mha", seed=3)[0].train()), path)
    return path


def run(*args):
    return main([str(a) for a in args])


def assert_same_state(got, expected):
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------- conversions
def test_flat_file_round_trip_is_bit_identical(exp, tmp_path, capsys):
    fused, back = tmp_path / "fused.pth", tmp_path / "back.pth"
    assert run(exp.ave, fused, "--to", "fused") == 0
    out = capsys.readouterr().out
    assert f"read {exp.ave}: flat state dict (" in out
    assert ("converted 2 attention layer(s) to fused: decoder.decoder.layers.1.layer., "
            "decoder.decoder.layers.4.layer.") in out
    assert f"left alone 1 other layer(s) with linear_q/k/v (outside --layer-pattern): {ENCODER}" in out
    assert "no wrapper prefixes" in out and f"wrote {fused}" in out
    state = torch.load(fused, weights_only=True)
    assert_same_state(state, to_fused(exp.stock_state()))
    exp.flash().load_state_dict(state, strict=True)
    assert run(fused, back, "--to", "stock") == 0
    assert_same_state(torch.load(back, weights_only=True), exp.stock_state())


def test_a_file_converted_to_fused_beside_a_stock_config_warns(exp, tmp_path, capsys):
    """The config.yaml that goes with a file converted to fused (beside the output, else beside
    the input) still naming mha would build the stock layer, whose loader drops linear_qkv:
    the report warns and says to convert the folder (an audit converted one file in place)."""
    fused = tmp_path / "fused.pth"
    assert run(exp.ave, fused, "--to", "fused") == 0
    out = capsys.readouterr().out
    assert (f"warning: {exp.root / 'config.yaml'} names the stock mha at decoder_conf.layer[1]: a model "
            "built from it has the stock layer") in out
    assert "Convert the whole experiment folder instead" in out
    (tmp_path / "config.yaml").write_text(exp.flash_config.read_text())  # the config beside the output
    assert run(exp.ave, fused, "--to", "fused", "--force") == 0
    assert "warning" not in capsys.readouterr().out
    assert run(fused, tmp_path / "back.pth", "--to", "stock") == 0  # no such warning for stock
    assert "warning" not in capsys.readouterr().out


def test_converted_file_works_with_stock_espnet_asr_inference(exp, tmp_path):
    # A fused file exported back to stock runs in unmodified ESPnet (stock config).
    from espnet2.bin.asr_inference import Speech2Text

    ours = exp.flash(seed=9)
    fused, stock = tmp_path / "ours.pth", tmp_path / "stock.pth"
    torch.save(ours.state_dict(), fused)
    assert run(fused, stock, "--to", "stock") == 0
    speech = espnet_asr.batch()["speech"][0]
    results = [Speech2Text(asr_train_config=config, asr_model_file=path, device="cpu", beam_size=3, nbest=2)(speech)
               for config, path in ((exp.stock_config, stock), (exp.flash_config, fused))]
    assert [r[2] for r in results[0]] == [r[2] for r in results[1]]


def test_prefixed_file_is_written_clean(exp, tmp_path, capsys):
    wrapped = torch.nn.DataParallel(torch.compile(espnet_asr.build(exp.root, "mha", seed=1)[0]))
    src, dst = tmp_path / "wrapped.pth", tmp_path / "clean.pth"
    torch.save(wrapped.state_dict(), src)
    assert run(src, dst, "--to", "fused") == 0
    assert "stripped wrapper prefixes: module., _orig_mod." in capsys.readouterr().out
    assert_same_state(torch.load(dst, weights_only=True), to_fused(exp.stock_state()))


def test_layer_pattern_selects_the_layers(exp, tmp_path, capsys):
    dst = tmp_path / "all.pth"
    assert run(exp.ave, dst, "--to", "fused", "--layer-pattern", "") == 0
    assert "converted 3 attention layer(s)" in capsys.readouterr().out
    assert f"{ENCODER}linear_qkv.weight" in torch.load(dst, weights_only=True)


def test_python_dash_m_and_console_script(exp, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "espnet-mha-convert")
    for i, command in enumerate([[sys.executable, "-m", "espnet_mha.convert"], [script]]):
        dst = tmp_path / f"out{i}.pth"
        done = subprocess.run([*command, str(exp.ave), str(dst), "--to", "fused"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "converted 2 attention layer(s) to fused" in done.stdout
        assert_same_state(torch.load(dst, weights_only=True), to_fused(exp.stock_state()))


# ---------------------------------------------------------- training checkpoints
def test_training_checkpoint_needs_explicit_flags_then_resumes_in_espnet(exp, checkpoint_file, tmp_path, capsys):
    dst = tmp_path / "checkpoint.pth"
    assert run(checkpoint_file, dst, "--to", "fused") == 1
    err = capsys.readouterr().err
    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        assert "refuses 1 class(es) that are not tensors:" in err
        assert "datetime.timedelta at ['reporter']['stats'][1]['train']['time']" in err
        assert "allow exactly these with: --allow-global datetime.timedelta" in err
    else:
        assert "refused it" in err and "datetime.timedelta" in err, err
    assert not dst.exists() and not leftovers(tmp_path)

    assert run(checkpoint_file, dst, "--to", "fused", "--allow-global", "datetime.timedelta") == 0
    out = capsys.readouterr().out
    assert "ESPnet training checkpoint (state dict in entry 'model'" in out
    assert "converted the state of 1 optimizer(s) to the fused parameter list" in out

    with pytest.raises(ValueError, match=r"doesn't match the size of optimizer's group"):
        espnet_asr.resume(checkpoint_file, exp.flash())  # why the optimizer state is converted: stock Adam state, fused model
    ours = exp.flash()
    reporter = espnet_asr.resume(dst, ours)[2]
    assert reporter.get_epoch() == 1
    original = torch.load(checkpoint_file, weights_only=False)
    assert_same_state(ours.state_dict(), to_fused(original["model"]))
    converted = torch.load(dst, weights_only=False)
    assert repr(converted["reporter"]) == repr(original["reporter"])  # repr: the stats hold NaN
    assert converted["schedulers"] == original["schedulers"]

    assert run(checkpoint_file, dst, "--to", "fused", "--allow-global", "datetime.timedelta",
               "--drop-optimizer-state", "--force") == 0
    assert "dropped the state of 1 optimizer(s)" in capsys.readouterr().out
    assert torch.load(dst, weights_only=False)["optimizers"] == []
    espnet_asr.resume(dst, exp.flash())


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


# ---------------------------------------------------------------- refusals, errors
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


def test_nothing_to_convert(exp, tmp_path, capsys):
    dst = tmp_path / "out.pth"
    assert run(exp.ave, dst, "--to", "stock") == 1
    assert "nothing to convert to stock: no linear_qkv keys and no wrapper prefixes" in capsys.readouterr().err
    assert run(exp.ave, dst, "--to", "fused", "--layer-pattern", "nomatch") == 1
    err = capsys.readouterr().err
    assert ("nothing to convert to fused: no linear_q/k/v keys under a layer prefix matching "
            "--layer-pattern 'nomatch'") in err
    assert (f"other layers with linear_q/k/v: {ENCODER}, decoder.decoder.layers.1.layer., "
            "decoder.decoder.layers.4.layer.") in err
    fused = tmp_path / "fused.pth"
    torch.save(to_fused(exp.stock_state()), fused)
    assert run(fused, dst, "--to", "fused") == 1
    assert "2 layer(s) are fused already" in capsys.readouterr().err
    with pytest.raises(ConversionError, match=r"nothing to convert to stock: no linear_qkv keys"):
        convert_file(exp.ave, dst, to="stock")
    assert not dst.exists()
    assert "to_fused converted nothing" not in err  # the error names the layers; no second message


def test_a_bare_layers_file_is_fused(tmp_path, capsys):
    """A file holding one stock layer's state dict (top-level keys) converts by default."""
    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    from espnet_mha import FlashMultiHeadedAttention

    src, dst = tmp_path / "layer.pth", tmp_path / "fused.pth"
    stock = MultiHeadedAttention(8, 2)
    torch.save(stock.state_dict(), src)
    assert run(src, dst, "--to", "fused") == 0
    assert "converted 1 attention layer(s) to fused: (a bare layer's keys, no prefix)" in capsys.readouterr().out
    FlashMultiHeadedAttention(8, 2).load_state_dict(torch.load(dst, weights_only=True), strict=True)
    assert "linear_qkv.weight" in torch.load(dst, weights_only=True)


def test_half_converted_file_names_missing_keys(exp, tmp_path, capsys):
    state = exp.stock_state()
    del state["decoder.decoder.layers.1.layer.linear_v.bias"]
    src, dst = tmp_path / "half.pth", tmp_path / "out.pth"
    torch.save(state, src)
    assert run(src, dst, "--to", "fused") == 1
    assert ("half-converted attention layer at 'decoder.decoder.layers.1.layer.': "
            in capsys.readouterr().err)
    with pytest.raises(KeyError, match=r"missing \['decoder\.decoder\.layers\.1\.layer\.linear_v\.bias'\]"):
        convert_file(src, dst, to="fused")
    assert not dst.exists()


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
