"""``espnet-mha-convert`` on each kind of file ESPnet writes, and ESPnet reading the results."""

import os
import subprocess
import sys

import pytest
import torch

import espnet_asr
from checkpoint_cases import assert_same_state
from convert_cases import leftovers, run
from espnet_mha.checkpoint import to_fused
from espnet_mha.convert import ConversionError, convert_file

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
ENCODER = espnet_asr.ENCODER_ATTENTION


@pytest.fixture(scope="module")
def checkpoint_file(exp):
    """``checkpoint.pth`` of a stock model after one training step (reporter, Adam, WarmupLR)."""
    path = exp.root / "checkpoint.pth"
    torch.save(espnet_asr.training_checkpoint(espnet_asr.build(exp.root, "mha", seed=3)[0].train()), path)
    return path


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


def test_a_link_converted_in_place_converts_the_file_it_names(exp, tmp_path, capsys):
    """ESPnet's valid.acc.ave.pth is a link to valid.acc.ave_3best.pth. Converted in place, the
    link was replaced by a converted copy, leaving the file it named (and any other link to
    it) in the stock layout (an audit)."""
    target = tmp_path / "valid.acc.ave_3best.pth"
    target.write_bytes(exp.ave.read_bytes())
    link = tmp_path / "valid.acc.ave.pth"
    link.symlink_to(target.name)
    assert run(link, link, "--to", "fused", "--force") == 0
    assert f"wrote {target}" in capsys.readouterr().out
    assert link.is_symlink() and os.readlink(link) == target.name
    assert_same_state(torch.load(target, weights_only=True), to_fused(exp.stock_state()))
    assert leftovers(tmp_path) == []


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


# ---------------------------------------------------------------- refusals, errors
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


def test_half_converted_file_names_missing_keys(exp, tmp_path, capsys):
    state = exp.stock_state()
    del state["decoder.decoder.layers.1.layer.linear_v.bias"]
    src, dst = tmp_path / "half.pth", tmp_path / "out.pth"
    torch.save(state, src)
    assert run(src, dst, "--to", "fused") == 1
    # The file too, as in a folder (an audit: a single file's error named only the layer).
    assert (f"{src}: half-converted attention layer at 'decoder.decoder.layers.1.layer.': "
            in capsys.readouterr().err)
    with pytest.raises(KeyError, match=r"missing \['decoder\.decoder\.layers\.1\.layer\.linear_v\.bias'\]"):
        convert_file(src, dst, to="fused")
    assert not dst.exists()
