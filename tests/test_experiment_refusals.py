"""What a folder conversion refuses, skips and reports (configs, links, odd files, failures); OUT_DIR is left as it was."""

import re

import pytest
import torch
import yaml

from espnet_mha.checkpoint import to_stock
from espnet_mha.convert import ConversionError
from espnet_mha.export import convert_experiment, export_experiment
from convert_cases import run
from experiment_cases import experiment

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_refusals(tmp_path, capsys):
    src = experiment(tmp_path / "exp", causal=True)
    out = tmp_path / "stock"
    assert run(src, out, "--to", "stock") == 1
    assert ("decoder_conf.layer[1]: flash_mha with causal: true has no stock equivalent"
            in capsys.readouterr().err)
    assert not out.exists()
    with pytest.raises(SystemExit):
        run(src, out, "--to", "fused", "--layer-pattern", "")
    assert "--layer-pattern selects layers of files" in capsys.readouterr().err
    with pytest.raises(ConversionError, match=r"no config\.yaml"):
        export_experiment(tmp_path, out)
    plain = experiment(tmp_path / "plain")
    assert run(plain, out, "--to", "stock") == 0
    assert run(plain, out, "--to", "stock") == 1
    assert "exist(s); pass --force" in capsys.readouterr().err
    assert run(plain, out, "--to", "stock", "--force") == 0
    with pytest.raises(FileExistsError, match=r"pass --force .* \(OUT_DIR is EXP_DIR: convert it in place\)"):
        export_experiment(plain, plain)
    with pytest.raises(ValueError, match=r"to must be 'stock' or 'fused', got 'fusd'"):
        convert_experiment(plain, out, to="fusd")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConversionError, match=r"a_file is a file: a folder EXP_DIR .* is converted into a folder"):
        convert_experiment(plain, tmp_path / "a_file", to="stock")
    (plain / "config.yaml").write_text("a: [b\n")
    assert run(plain, tmp_path / "o2", "--to", "stock") == 1
    assert "not YAML ESPnet can read" in capsys.readouterr().err
    # A config that names no attention layer (no decoder, a layer list that is not one): the
    # weights were converted and the config left as it was, exit 0 (found by a probe).
    for config in ({"encoder": "conformer"}, {"decoder": "s4", "decoder_conf": {"layer": "flash_mha"}}, [], None):
        (plain / "config.yaml").write_text(yaml.safe_dump(config))
        assert run(plain, tmp_path / "o3", "--to", "stock") == 1
        assert re.search(r"config\.yaml names no 'mha' layer \(_name_: mha; after the conversion\), but the "
                         r"model files hold attention layers to convert \(1epoch\.pth: \d", capsys.readouterr().err)
        assert not (tmp_path / "o3" / "1epoch.pth").exists()


def test_links_odd_files_and_failures(tmp_path, capsys):
    """Links stay links only where their target is exported; what is left out is reported;
    a failure leaves OUT_DIR as it was; file modes are kept."""
    src = experiment(tmp_path / "exp")
    (src / "latest.pth").symlink_to("checkpoint.pth")  # checkpoint.pth is skipped
    (src / "gone.pth").symlink_to("missing.pth")
    (src / "absolute.pth").symlink_to(src / "2epoch.pth")
    torch.save({"not": "a model"}, src / "stats.pth")
    (src / "1epoch.pth").chmod(0o600)
    out = tmp_path / "stock"
    assert run(src, out, "--to", "stock") == 0
    report = capsys.readouterr().out
    assert "linked absolute.pth -> 2epoch.pth" in report
    assert "skipped latest.pth: a link to checkpoint.pth, which is not exported" in report
    assert "skipped gone.pth: a link to missing.pth, which does not exist" in report
    assert "skipped stats.pth: not an ESPnet model file" in report
    assert sorted(p.name for p in out.iterdir()) == ["1epoch.pth", "2epoch.pth", "absolute.pth", "config.yaml",
                                                     "valid.acc.ave.pth", "valid.acc.best.pth"]
    assert (out / "absolute.pth").readlink().name == "2epoch.pth"
    assert (out / "1epoch.pth").stat().st_mode & 0o777 == 0o600

    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.is_symlink()}
    (src / "3epoch.pth").write_bytes(b"damaged")
    assert run(src, out, "--to", "stock", "--force") == 1
    assert "3epoch.pth: cannot read it" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.is_symlink()} == before  # nothing half-written
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    # A file whose layer cannot be converted: the layer's error, and which file (a probe
    # found only the layer named, one file of several).
    state = torch.load(src / "2epoch.pth", weights_only=True)
    state = {**to_stock(state), **{k: v for k, v in state.items() if "linear_qkv" in k}}  # both layouts
    torch.save(state, src / "3epoch.pth")
    assert run(src, out, "--to", "stock", "--force") == 1
    assert re.search(rf"error: {re.escape(str(src / '3epoch.pth'))}: attention layer at "
                     r"'decoder\.decoder\.layers\.\d\.layer\.' has both fused keys and stock",
                     capsys.readouterr().err)
    with pytest.raises(KeyError, match=r"3epoch\.pth: attention layer at .* has both fused keys and stock"):
        convert_experiment(src, out, to="stock", force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.is_symlink()} == before
    # Into an OUT_DIR that did not exist: none is left behind (a probe found it made and left
    # empty); a 0-D weight is named, not an IndexError's traceback.
    state = torch.load(src / "2epoch.pth", weights_only=True)
    key = next(k for k in state if k.endswith("linear_qkv.weight"))
    torch.save({**state, key: torch.tensor(1.0)}, src / "3epoch.pth")
    fresh = tmp_path / "new" / "stock"
    assert run(src, fresh, "--to", "stock") == 1
    assert re.search(rf"error: {re.escape(str(src / '3epoch.pth'))}: .*linear_qkv\.weight: expected shape "
                     r"\(3D, D\), found \(\)", capsys.readouterr().err)
    with pytest.raises(ValueError, match=r"3epoch\.pth: .*linear_qkv\.weight: expected shape \(3D, D\)"):
        convert_experiment(src, fresh, to="stock")
    assert not (tmp_path / "new").exists()


def test_a_config_that_is_not_yaml_is_refused_before_anything_is_written(tmp_path):
    src = experiment(tmp_path / "exp")
    (src / "config.yaml").write_text("a: [b\n")
    out = tmp_path / "stock"
    with pytest.raises(ConversionError, match=r"exp/config\.yaml: not YAML ESPnet can read \(while parsing a flow "
                                              r"sequence"):
        convert_experiment(src, out, to="stock")
    assert not out.exists()


def test_a_config_that_names_no_attention_layer_is_refused(tmp_path):
    """ESPnet would build the config's layers and load the converted weights beside them with
    strict=False: q/k/v dropped without a word. Nothing is written."""
    src = experiment(tmp_path / "exp")
    (src / "config.yaml").write_text(yaml.safe_dump({"encoder": "conformer"}))
    out = tmp_path / "stock"
    with pytest.raises(ConversionError, match=r"exp/config\.yaml names no 'mha' layer \(_name_: mha; after the "
                                              r"conversion\), but the model files hold attention layers to convert "
                                              r"\(1epoch\.pth: 2, 2epoch\.pth: 2, valid\.acc\.best\.pth: 2\)"):
        export_experiment(src, out)
    assert not out.exists()  # made for the conversion, removed with it
